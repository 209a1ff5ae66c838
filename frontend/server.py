"""``agentiso serve``: the MCP server on stdio.

Built on the official SDK's :class:`MCPServer`.  The server's state lives in a
:class:`Runtime` made by the lifespan: the catalog, this process's session,
and the orchestrator with its kept connections.  If the helper cannot be
reached the server still starts; every tool that needs it answers with one
clear error saying how to start it, and the next call tries again.

The tools themselves are in ``tools_workspace``, ``tools_exec``, ``tools_files``,
``tools_network`` and ``tools_snapshots``; each takes ``workspace`` (a name or
an id).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from mcp.server.mcpserver import MCPServer

from . import __version__
from .catalog import Catalog
from .config import FrontendConfig
from .errors import FrontendError
from .hostpaths import HostRoots
from .sessions import Session, session_alive
from .toolerrors import ToolServer
from .workspaces import Workspaces

log = structlog.get_logger("agentiso.frontend.server")

INSTRUCTIONS = """\
agentiso gives you isolated Linux workspaces (QEMU microVMs) that you can run
anything in without touching the host.  Start with workspace_create (it returns
when the workspace is running), then use exec to run shell commands, and the
file_* tools to read, write and edit files in it.  Long-running commands:
exec_background, then exec_poll.  Host files move with file_upload and
file_download (only under the host roots configured for you).  Every tool takes
`workspace`: the name you gave it, or its id.  workspace_destroy deletes the
workspace and its disk for good; workspace_stop keeps the disk.
"""


#: Jobs whose poll offsets are remembered (a job beyond is polled from 0 or as asked).
MAX_POLL_OFFSETS = 4096


class NotReady(FrontendError):
    """A tool ran before the server finished starting (should not happen)."""


@dataclass
class Runtime:
    """What the tools share; filled in by the lifespan."""

    config: FrontendConfig
    roots: HostRoots | None = None
    _ws: Workspaces | None = None
    #: exec_poll's default offsets, per (workspace id, job): where the last poll ended.
    poll_offsets: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def remember_poll(self, workspace: str, job: int, offsets: tuple[int, int]) -> None:
        """Where the last exec_poll of a job ended (bounded: the oldest are forgotten)."""
        self.poll_offsets.pop((workspace, job), None)
        self.poll_offsets[(workspace, job)] = offsets
        while len(self.poll_offsets) > MAX_POLL_OFFSETS:
            del self.poll_offsets[next(iter(self.poll_offsets))]

    @property
    def ws(self) -> Workspaces:
        if self._ws is None:
            raise NotReady("the agentiso server is still starting\nRetry in a moment.")
        return self._ws


def build_server(config: FrontendConfig) -> MCPServer[Any]:
    rt = Runtime(config)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[Runtime]:
        catalog = Catalog.open(config.state_dir / "catalog.db")
        session = Session(config.state_dir)
        catalog.add_session(session.id, os.getpid(), "agentiso serve")
        catalog.prune_sessions(lambda sid: session_alive(config.state_dir, sid))
        try:
            rt.roots = (HostRoots(config.host_roots, config_file=config.source or "")
                        if config.host_roots else None)
        except FrontendError as exc:
            log.warning("host_roots_unusable", error=str(exc))
        if os.geteuid() == 0:
            log.warning("running_as_root", hint="agentiso serve needs no privileges: run it as "
                        "the user, in the agentiso group")
        log.info("serving", session=session.id, helper=config.helper_socket,
                 catalog=str(config.state_dir / "catalog.db"), config=config.source)
        try:
            async with anyio.create_task_group() as tg:
                rt._ws = Workspaces(config, catalog, session, tg)
                tg.start_soon(_reconcile, rt._ws)
                try:
                    yield rt
                finally:
                    tg.cancel_scope.cancel()
        finally:
            rt._ws = None
            catalog.end_session(session.id)
            session.close()
            catalog.close()

    app: MCPServer[Any] = ToolServer(
        "agentiso", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan,
        log_level="INFO",
    )
    from . import (
        tools_exec,
        tools_files,
        tools_forks,
        tools_git,
        tools_golden,
        tools_network,
        tools_parallel,
        tools_snapshots,
        tools_workspace,
    )

    tools_workspace.register(app, rt)
    tools_exec.register(app, rt)
    tools_files.register(app, rt)
    tools_network.register(app, rt)
    tools_snapshots.register(app, rt)
    tools_forks.register(app, rt)
    tools_parallel.register(app, rt)
    tools_git.register(app, rt)
    tools_golden.register(app, rt)
    return app


async def _reconcile(ws: Workspaces) -> None:
    """Bring the catalog in step with the helper at start-up; an unreachable
    helper is not fatal (the tools will say how to start it)."""
    try:
        await ws.reconcile_all()
    except Exception as exc:
        log.warning("reconcile_skipped", error=str(exc))


def check_state(config: FrontendConfig) -> None:
    """Open (and close) the catalog and a session lock, so that an unusable
    state directory is reported as a FrontendError before serving."""
    Catalog.open(config.state_dir / "catalog.db").close()
    try:
        Session(config.state_dir).close()
    except OSError as exc:
        raise NotReady(f"cannot make a session lock in {config.state_dir}: {exc.strerror}\n"
                       "Check that the state directory is writable by you (or set "
                       "state_dir in config.toml).") from None


def serve(config: FrontendConfig) -> None:
    """Run the MCP server on stdio until the client closes it."""
    build_server(config).run("stdio")
