"""The ``exec`` handler: run a command to completion.

Both output pipes are drained the whole time, past the caps too (the excess
is counted and dropped), so a command never blocks on a full pipe whatever
it prints.  When streaming, reading pauses while the host has no credit, which
pauses the command: that is the intended backpressure.

The command is done when it has exited and its pipes are at EOF.  A process
it left in the background may hold the pipes open forever, so after the exit
we wait at most ``POST_EXIT_IDLE_S`` of silence (and ``POST_EXIT_MAX_S`` in
all) for EOF, then stop reading.  On timeout the whole process group gets
SIGKILL.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from agentiso.protocol import guest as gp

from .connection import RequestContext
from .fdio import read_some
from .process import Child, command_argv, merged_env, spawn
from .reaper import decode_status

READ_SIZE = 256 * 1024
POST_EXIT_IDLE_S = 0.25
POST_EXIT_MAX_S = 2.0


@dataclass
class _Sink:
    """One output stream of one exec: what is kept and what was produced."""

    cap: int
    kept: bytearray
    total: int = 0

    def take(self, data: bytes) -> bytes:
        """Count ``data``; return the part within the cap."""
        room = max(self.cap - (self.total), 0)
        self.total += len(data)
        return data[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap


class _Streamer:
    """Sends ExecOutput events under the request's credit."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.seq = 0

    async def emit(self, stream: gp.OutputStream, data: bytes) -> None:
        for i in range(0, len(data), gp.MAX_CHUNK):
            self.seq += 1
            await self.ctx.credit.wait_for(self.seq)
            await self.ctx.send(
                gp.ExecOutput(id=self.ctx.id, seq=self.seq, stream=stream,
                              data=data[i : i + gp.MAX_CHUNK])
            )


async def pump(fd: int, exited: asyncio.Event, consume: _Consumer) -> None:
    """Read ``fd`` to EOF (or post-exit silence) and hand the bytes on."""
    deadline: float | None = None
    while True:
        timeout = None
        if exited.is_set():
            now = time.monotonic()
            if deadline is None:
                deadline = now + POST_EXIT_MAX_S
            timeout = min(POST_EXIT_IDLE_S, max(deadline - now, 0.0))
        data = await read_some(fd, READ_SIZE, timeout=timeout if timeout is not None else 0.5)
        if data is None:
            if exited.is_set() and timeout is not None:
                return
            continue
        if not data:
            return
        await consume(data)


class _Consumer:
    def __init__(self, stream: gp.OutputStream, sink: _Sink, streamer: _Streamer | None):
        self.stream = stream
        self.sink = sink
        self.streamer = streamer

    async def __call__(self, data: bytes) -> None:
        kept = self.sink.take(data)
        if not kept:
            return
        if self.streamer is not None:
            await self.streamer.emit(self.stream, kept)
        else:
            self.sink.kept += kept


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Mark the outcome as seen: a cancelled gather must not be logged as lost.
    if not fut.cancelled():
        fut.exception()


async def run_child(
    child: Child,
    timeout_s: float,
    out: _Consumer,
    err: _Consumer,
) -> tuple[int, bool]:
    """Drain and wait for ``child``; ``(raw status, timed_out)``."""
    exited = asyncio.Event()
    child.exited.add_done_callback(lambda _f: exited.set())
    pumps = asyncio.gather(
        pump(child.stdout, exited, out), pump(child.stderr, exited, err)
    )
    pumps.add_done_callback(_retrieve)
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                # shield: a timeout must not cancel the reaper's future.
                status = await asyncio.shield(child.exited)
        except TimeoutError:
            timed_out = True
            child.killpg()
            status = await asyncio.shield(child.exited)
            # The deadline has passed: output still stuck behind a host that
            # gives no credit is not worth waiting for.
            await asyncio.wait([pumps], timeout=POST_EXIT_MAX_S)
            if not pumps.done():
                pumps.cancel()
                await asyncio.wait([pumps])
        else:
            await pumps
    except BaseException:
        pumps.cancel()
        child.killpg()
        raise
    finally:
        child.close()
    return status, timed_out


async def handle_exec(req: gp.Exec, ctx: RequestContext) -> gp.ExecResult:
    state = ctx.state
    t0 = time.monotonic()
    child = spawn(
        command_argv(req), req.cwd, merged_env(state.env_defaults, req.env), req.stdin,
        state.reaper,
    )
    streamer = _Streamer(ctx) if req.stream else None
    so = _Sink(req.stdout_cap, bytearray())
    se = _Sink(req.stderr_cap, bytearray())
    try:
        status, timed_out = await run_child(
            child, req.timeout_s, _Consumer("stdout", so, streamer),
            _Consumer("stderr", se, streamer),
        )
    except asyncio.CancelledError:
        child.killpg()
        raise
    code, sig = decode_status(status)
    return gp.ExecResult(
        id=req.id,
        exit_code=code,
        signal=sig,
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
        stdout=bytes(so.kept),
        stderr=bytes(se.kept),
        stdout_bytes=so.total,
        stderr_bytes=se.total,
        stdout_truncated=so.truncated,
        stderr_truncated=se.truncated,
    )
