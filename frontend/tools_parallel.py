"""exec_parallel: one command (or one per workspace) in many workspaces at once.

The commands run concurrently, at most ``[limits] exec_parallelism`` at a
time.  Each one has its own deadline (its ``timeout_secs`` plus a short
grace): a workspace that is stopped fails at once, and one whose agent does
not answer is given up at its deadline, so it never holds the others'
results back.  Results come back in the order the workspaces were given.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from .execution import run_exec
from .results import ExecResult
from .results_git import ParallelItem, ParallelResult, ParallelSummary
from .toolerrors import BadArgument, describe, guest_errors, tool_errors
from .tools_exec import DEFAULT_TIMEOUT_SECS, Command, TimeoutSecs, Workdir, _check_timeout
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

#: How long past its timeout a command's answer is waited for (the agent
#: kills it at the timeout and answers at once; past this the agent is gone).
GRACE_S = 2.0


def plan_commands(workspaces: list[str], command: str | list[str], most: int) -> list[str]:
    """One command per workspace: the same one for all, or one each (pure)."""
    if len(workspaces) > most:
        raise BadArgument(f"{len(workspaces)} workspaces, above the limit of {most}\n"
                          "Name fewer workspaces (or raise [limits] max_parallel_workspaces).")
    if len(set(workspaces)) != len(workspaces):
        raise BadArgument("a workspace is named twice\nName each workspace once.")
    if isinstance(command, str):
        return [command] * len(workspaces)
    if len(command) != len(workspaces):
        raise BadArgument(f"{len(command)} commands for {len(workspaces)} workspaces\n"
                          "Give one command for all, or exactly one per workspace.")
    return list(command)


def summarize(items: list[ParallelItem], wall: float) -> ParallelSummary:
    ok = sum(1 for i in items if i.ok)
    errors = sum(1 for i in items if i.error is not None)
    return ParallelSummary(total=len(items), succeeded=ok, failed=len(items) - ok - errors,
                           errors=errors, wall_secs=round(wall, 3))


def _item(ws: str, command: str, r: ExecResult) -> ParallelItem:
    return ParallelItem(
        workspace=ws, command=command, ok=r.exit_code == 0 and not r.timed_out,
        exit_code=r.exit_code, timed_out=r.timed_out, stdout=r.stdout, stderr=r.stderr,
        stdout_encoding=r.stdout_encoding, stderr_encoding=r.stderr_encoding,
        stdout_truncated=r.stdout_truncated, stderr_truncated=r.stderr_truncated,
        duration_secs=r.duration_secs, error=None)


def _failed(ws: str, command: str, error: str, duration: float) -> ParallelItem:
    return ParallelItem(
        workspace=ws, command=command, ok=False, exit_code=None, timed_out=False, stdout="",
        stderr="", stdout_encoding="utf-8", stderr_encoding="utf-8", stdout_truncated=False,
        stderr_truncated=False, duration_secs=round(duration, 3), error=error)


def register(app: MCPServer[Any], rt: Runtime) -> None:
    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False, open_world_hint=False),
              description=(
        "Run a shell command in several workspaces at once (e.g. the forks of one "
        "workspace): `command` is one command for all, or a list with one per workspace "
        "in the same order. Returns one result per workspace (exit code, stdout/stderr "
        "with truncation flags, duration, or why it could not run) and a summary. A "
        "stopped or unresponsive workspace gets an error and never delays the others "
        "past timeout_secs. At most [limits] max_parallel_workspaces (20) workspaces; "
        "[limits] exec_parallelism (8) run at a time. Each workspace's end is reported as "
        "a progress notification."))
    @tool_errors
    async def exec_parallel(
        ctx: Context,
        workspaces: Annotated[list[WorkspaceRef], Field(min_length=1, max_length=1000,
                                                        description="Names or ids")],
        command: Command | Annotated[list[Command], Field(min_length=1, max_length=1000)],
        timeout_secs: TimeoutSecs | None = None,
        workdir: Workdir | None = None,
    ) -> ParallelResult:
        limits = rt.config.limits
        commands = plan_commands(workspaces, command, limits.max_parallel_workspaces)
        if timeout_secs is None:
            timeout_secs = min(DEFAULT_TIMEOUT_SECS, limits.max_exec_timeout_secs)
        _check_timeout(rt, timeout_secs)
        results: list[ParallelItem | None] = [None] * len(workspaces)
        limiter = anyio.CapacityLimiter(limits.exec_parallelism)
        started = time.monotonic()
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            ws, cmd = workspaces[i], commands[i]
            await run_one(i, ws, cmd, time.monotonic())  # records every failure itself
            done += 1
            item = results[i]
            how = ("not run" if item is None or item.error is not None
                   else "timed out" if item.timed_out else f"exit {item.exit_code}")
            await ctx.report_progress(done, len(workspaces), f"{ws}: {how}")

        async def run_one(i: int, ws: str, cmd: str, t0: float) -> None:
            try:
                async with limiter:
                    with anyio.fail_after(timeout_secs + GRACE_S):
                        rec = rt.ws.owned(ws)
                        async with rt.ws.guest(rec) as g:
                            with guest_errors("exec", workdir=workdir):
                                r = await run_exec(
                                    g, command=cmd, workdir=workdir or "/root",
                                    env=dict(rec.env), timeout_s=float(timeout_secs),
                                    stdin=b"", cap=limits.exec_parallel_output_cap_bytes,
                                    spill_max=limits.exec_spill_max_bytes)
                results[i] = _item(ws, cmd, r)
            except TimeoutError:
                results[i] = _failed(ws, cmd, (
                    f"workspace {ws!r} gave no answer within {timeout_secs + GRACE_S:g} s\n"
                    "Check it with workspace_info and workspace_logs; restart it if its "
                    "agent is stuck."), time.monotonic() - t0)
            except Exception as exc:
                results[i] = _failed(ws, cmd, describe(exc, "exec_parallel"),
                                     time.monotonic() - t0)

        async with anyio.create_task_group() as tg:
            for i in range(len(workspaces)):
                tg.start_soon(one, i)
        items = [r for r in results if r is not None]
        return ParallelResult(results=items, summary=summarize(items,
                                                               time.monotonic() - started))
