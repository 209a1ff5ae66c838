"""``agentiso``: the user-facing command.

``agentiso status`` checks that the helper is reachable and shows how it sees
you.  The MCP server (``agentiso serve``) arrives with the frontend issue.
"""

from __future__ import annotations

import argparse
import sys

import anyio

from agentiso.protocol.errors import ProtocolError

from . import __version__
from .helper_client import HelperUnavailable, connect_helper

DEFAULT_HELPER_SOCKET = "/run/agentiso/helper.sock"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentiso", description="agentiso workspaces for AI agents")
    p.add_argument("--version", action="version", version=f"agentiso {__version__}")
    p.add_argument("--helper-socket", default=DEFAULT_HELPER_SOCKET)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="check the connection to agentiso-helper")
    return p


async def _status(socket_path: str) -> int:
    async with connect_helper(socket_path, client_name="agentiso-cli") as helper:
        who = await helper.whoami()
        assert helper.hello is not None
        print(f"helper: {helper.hello.server}, up {helper.hello.uptime_s:.0f} s")
        print(f"you:    uid {who.uid} gid {who.gid}{' (admin)' if who.admin else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return anyio.run(_status, args.helper_socket)
    except (HelperUnavailable, ProtocolError) as exc:
        print(f"agentiso: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
