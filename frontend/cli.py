"""``agentiso``: the user-facing command.

* ``agentiso serve``: the MCP server on stdio (what an MCP client runs).
* ``agentiso status``: is the helper reachable, and my workspaces.
* ``agentiso list``: my workspaces (catalog and helper joined).
* ``agentiso doctor``: can I use agentiso; if not, why and what to do.

``--config`` names the user config (default: ``config.toml`` in the user's
config dir); ``--helper-socket`` overrides the helper socket it names.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import anyio

from agentiso.protocol.errors import RemoteError, WireError

from . import __version__
from .config import FrontendConfig, load_config
from .errors import FrontendError


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
    sub.add_parser("status", parents=[common],
                   help="is the helper reachable, and your workspaces")
    sub.add_parser("list", parents=[common], help="your workspaces")
    sub.add_parser("doctor", parents=[common],
                   help="can you use agentiso; if not, why and what to do")
    return p


async def _status(config: FrontendConfig, *, table_only: bool) -> int:
    from . import status

    try:
        hello, who, snap, where = await status.gather(config)
    except (FrontendError, RemoteError, WireError) as exc:
        print(f"helper:     NOT reachable: {exc}\n"
              "            run 'agentiso doctor' to see why and what to do")
        return 1
    rows, untracked = status.workspace_rows(snap)
    if table_only:
        print(status.render_list(rows, untracked))
    else:
        print(status.render_status(hello, who, where, rows, untracked))
    return 0


async def _doctor(config_path: Path | None, helper_socket: str | None) -> int:
    from . import doctor

    checks = doctor.judge(await doctor.gather(config_path, helper_socket))
    print(doctor.render(checks))
    return doctor.exit_code(checks)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        # Doctor reports a bad config as one of its findings, so it loads it itself.
        return anyio.run(_doctor, getattr(args, "config", None),
                         getattr(args, "helper_socket", None))
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
        return anyio.run(partial(_status, config, table_only=args.command == "list"))
    except (FrontendError, RemoteError, WireError) as exc:
        print(f"agentiso: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
