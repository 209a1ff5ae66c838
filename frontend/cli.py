"""``agentiso``: the user-facing command.

* ``agentiso serve``: the MCP server on stdio (what an MCP client runs).
* ``agentiso status``: is the helper reachable, and how does it see you.

``--config`` names the user config (default: ``config.toml`` in the user's
config dir); ``--helper-socket`` overrides the helper socket it names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from agentiso.protocol.errors import WireError

from . import __version__
from .config import load_config
from .errors import FrontendError
from .helper_client import connect_helper


def _parser() -> argparse.ArgumentParser:
    # --config and --helper-socket are taken before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="user config file (default: config.toml in your config dir)")
    common.add_argument("--helper-socket", default=argparse.SUPPRESS,
                        help="the helper's socket")
    p = argparse.ArgumentParser(prog="agentiso", parents=[common],
                                description="agentiso workspaces for AI agents")
    p.add_argument("--version", action="version", version=f"agentiso {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common],
                           help="run the MCP server on stdio (for MCP clients)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    sub.add_parser("status", parents=[common], help="check the connection to agentiso-helper")
    return p


async def _status(socket_path: str) -> int:
    async with connect_helper(socket_path, client_name="agentiso-cli") as helper:
        who = await helper.whoami()
        hello = helper.hello
        if hello is not None:
            print(f"helper: {hello.server}, up {hello.uptime_s:.0f} s")
        print(f"you:    uid {who.uid} gid {who.gid}{' (admin)' if who.admin else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None),
                             helper_socket=getattr(args, "helper_socket", None))
        if args.command == "serve":
            from . import logs
            from .server import check_state, serve

            logs.configure(args.log_level)
            check_state(config)  # a clear message now, not a traceback from the server
            serve(config)
            return 0
        return anyio.run(_status, config.helper_socket)
    except (FrontendError, WireError) as exc:
        print(f"agentiso: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
