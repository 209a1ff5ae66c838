"""The command tools: exec, exec_background, exec_poll, exec_kill, set_env."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from .execution import decode_output, decode_prefix, run_exec
from .results import EnvResult, ExecResult, JobKilled, JobPoll, JobStarted
from .toolerrors import BadArgument, guest_call, guest_errors, tool_errors
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

Command = Annotated[str, Field(min_length=1, max_length=128 * 1024,
                               description="Shell command line, run with /bin/sh -c")]
Workdir = Annotated[str, Field(min_length=1, max_length=4095, pattern=r"^/",
                               description="Absolute directory to run in (default: /root)")]
EnvKey = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, Field(max_length=32 * 1024)]
Env = Annotated[dict[EnvKey, EnvValue], Field(max_length=1024,
                                               description="Extra environment variables")]
TimeoutSecs = Annotated[int, Field(ge=1, le=86400, description=(
    "Kill the command (and its process group) after this many seconds (default 600, at "
    "most the configured limit)"))]
Stdin = Annotated[str, Field(max_length=1024 * 1024, description="Text fed to stdin")]
JobId = Annotated[int, Field(ge=1, le=2**53 - 1, description="Job id from exec_background")]

#: The guest protocol's bounds on an exec's environment and stdin.
MAX_ENV = 1024
MAX_STDIN = 1024 * 1024
SIGNALS = {"TERM": 15, "KILL": 9, "INT": 2, "HUP": 1, "QUIT": 3, "USR1": 10, "USR2": 12,
           "STOP": 19, "CONT": 18}


#: An exec's timeout when the call names none (bounded by the configured limit).
DEFAULT_TIMEOUT_SECS = 600
#: Total bytes of environment one exec may carry (the guest frame is 4 MiB).
MAX_ENV_BYTES = 256 * 1024


def _check_env_size(env: dict[str, str] | None, base: dict[str, str] | None = None) -> None:
    total = sum(len(k) + len(v.encode()) + 2 for k, v in {**(base or {}), **(env or {})}.items())
    if total > MAX_ENV_BYTES:
        raise BadArgument(f"the environment is {total} bytes, above the {MAX_ENV_BYTES}-byte "
                          "limit\nPass large data in a file (file_write) instead.")


def _check_timeout(rt: Runtime, timeout_secs: int) -> None:
    most = rt.config.limits.max_exec_timeout_secs
    if timeout_secs > most:
        raise BadArgument(f"timeout_secs {timeout_secs} is above the limit of {most} s\n"
                            "Ask for less, or use exec_background for long jobs.")


def register(app: MCPServer[Any], rt: Runtime) -> None:
    runs = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                           open_world_hint=False)

    @app.tool(annotations=runs, description=(
        "Run a shell command in the workspace and return its exit code, stdout and stderr. "
        "Output is streamed as progress notifications while it runs. Each stream carries at "
        "most the configured cap (256 KiB by default); past it, the result names a guest "
        "file with the whole output (stdout_file) to read with file_read. Cancelling the "
        "call kills the command's process group. Defaults from set_env apply."))
    @tool_errors
    async def exec(
        ctx: Context,
        workspace: WorkspaceRef,
        command: Command,
        workdir: Workdir | None = None,
        env: Env | None = None,
        timeout_secs: TimeoutSecs | None = None,
        stdin: Stdin | None = None,
    ) -> ExecResult:
        if timeout_secs is None:
            timeout_secs = min(DEFAULT_TIMEOUT_SECS, rt.config.limits.max_exec_timeout_secs)
        _check_timeout(rt, timeout_secs)
        _check_env_size(env)
        stdin_bytes = (stdin or "").encode()
        if len(stdin_bytes) > MAX_STDIN:
            raise BadArgument(f"stdin is {len(stdin_bytes)} bytes, above the {MAX_STDIN}-"
                                  "byte limit of one call\nWrite the input to a file "
                                  "(file_write or file_upload) and redirect from it.")
        rec = rt.ws.owned(workspace)
        merged = {**rec.env, **(env or {})}

        async def on_output(stream: str, data: bytes, total: int) -> None:
            text, _ = decode_output(data[:4096], truncated=True)
            await ctx.report_progress(total, None, f"[{stream}] {text}")

        async with rt.ws.guest(rec) as g:
            with guest_errors("exec", workdir=workdir):
                return await run_exec(
                    g, command=command, workdir=workdir or "/root", env=merged,
                    timeout_s=float(timeout_secs), stdin=stdin_bytes,
                    cap=rt.config.limits.exec_output_cap_bytes,
                    spill_max=rt.config.limits.exec_spill_max_bytes, on_output=on_output,
                )

    @app.tool(annotations=runs, description=(
        "Start a shell command in the background and return its job id at once. Read its "
        "output and status with exec_poll; stop it with exec_kill. Output beyond 1 MiB "
        "per stream that was not polled is dropped (exec_poll reports how much)."))
    @tool_errors
    async def exec_background(
        workspace: WorkspaceRef,
        command: Command,
        workdir: Workdir | None = None,
        env: Env | None = None,
        timeout_secs: TimeoutSecs | None = None,
    ) -> JobStarted:
        if timeout_secs is not None:
            _check_timeout(rt, timeout_secs)
        _check_env_size(env)
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("exec_background"):
            started = await g.job_start(
                shell=command, cwd=workdir or "/root", env={**rec.env, **(env or {})},
                timeout_s=float(timeout_secs) if timeout_secs else None,
            )
        rt.remember_poll(rec.id, started.job, (0, 0))
        return JobStarted(workspace=rec.name, job=started.job, pid=started.pid)

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=False), description=(
        "A background job's status and the output it wrote since the last poll (or from the "
        "offsets given). wait_secs waits up to that long for new output or the end."))
    @tool_errors
    async def exec_poll(
        workspace: WorkspaceRef,
        job: JobId,
        stdout_offset: Annotated[int, Field(ge=0, le=2**50)] | None = None,
        stderr_offset: Annotated[int, Field(ge=0, le=2**50)] | None = None,
        wait_secs: Annotated[float, Field(ge=0, le=60)] = 0,
    ) -> JobPoll:
        rec = rt.ws.owned(workspace)
        last = rt.poll_offsets.get((rec.id, job), (0, 0))
        out_off = last[0] if stdout_offset is None else stdout_offset
        err_off = last[1] if stderr_offset is None else stderr_offset
        async with rt.ws.guest(rec) as g, guest_call("exec_poll"):
            st = await g.job_poll(job, stdout_offset=out_off, stderr_offset=err_off,
                                  max_bytes=256 * 1024, wait_s=wait_secs)
        o, e = st.stdout, st.stderr
        # A character cut at the slice's end is left for the next poll, whole.
        out_text, out_enc, out_used = decode_prefix(o.data, cut=st.info.running)
        err_text, err_enc, err_used = decode_prefix(e.data, cut=st.info.running)
        rt.remember_poll(rec.id, job, (o.offset + out_used, e.offset + err_used))
        return JobPoll(
            job=job, running=st.info.running, exit_code=st.info.exit_code,
            signal=st.info.signal, timed_out=st.info.timed_out,
            stdout=out_text, stderr=err_text, stdout_encoding=out_enc, stderr_encoding=err_enc,
            stdout_offset=o.offset + out_used, stderr_offset=e.offset + err_used,
            stdout_lost_bytes=o.lost, stderr_lost_bytes=e.lost,
        )

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True), description=(
        "Send a signal to a background job's process group (default TERM; KILL cannot be "
        "caught)."))
    @tool_errors
    async def exec_kill(
        workspace: WorkspaceRef,
        job: JobId,
        signal: Annotated[str, Field(pattern=r"^(TERM|KILL|INT|HUP|QUIT|USR1|USR2|STOP|CONT"
                                             r"|[1-9]|[1-5][0-9]|6[0-4])$",
                                     description="Signal name (TERM, KILL, INT, ...) "
                                     "or number")] = "TERM",
    ) -> JobKilled:
        signo = SIGNALS.get(signal) or int(signal)
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("exec_kill"):
            await g.job_kill(job, signal=signo)
        return JobKilled(job=job, signal=signo)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=True), description=(
        "Set (or unset) default environment variables for this workspace's later exec and "
        "exec_background calls. Kept across restarts; an exec's own env wins."))
    @tool_errors
    async def set_env(
        workspace: WorkspaceRef,
        env: Env | None = None,
        unset: Annotated[list[EnvKey], Field(max_length=1024,
                                             description="Names to remove")] | None = None,
    ) -> EnvResult:
        rec = rt.ws.owned(workspace)
        after = {k: v for k, v in {**rec.env, **(env or {})}.items() if k not in (unset or [])}
        _check_env_size(after)
        if len(after) > MAX_ENV:
            raise BadArgument(f"that would make {len(after)} variables, above {MAX_ENV}\n"
                                  "Unset some first.")
        merged = rt.ws.catalog.set_env(rec.id, env or {}, unset or [])
        return EnvResult(workspace=rec.name, env_keys=sorted(merged))

