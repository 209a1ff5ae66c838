"""Background jobs: start, poll, kill, list, forget.

A job's stdout and stderr are drained continuously into ring buffers (the
job never blocks on output; old output is overwritten and reported as
``lost`` to a reader that falls behind).  Finished jobs stay listed until
forgotten or evicted: when more than ``max_finished`` are kept, those whose
end and whole output a poll already delivered go first, then the oldest.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from .connection import RequestContext
from .errors import Failed
from .fdio import read_some
from .process import Child, command_argv, command_summary, merged_env, spawn
from .reaper import Reaper, decode_status
from .ring import RingBuffer
from .state import kernel_uptime

MAX_RUNNING = 128
MAX_FINISHED = 64


@dataclass
class Job:
    id: int
    child: Child
    command: str
    out: RingBuffer
    err: RingBuffer
    started_s: float
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    ended_s: float | None = None
    #: A poll delivered the job's end and all of its output.
    drained: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.ended_s is None

    def info(self) -> gp.JobInfo:
        return gp.JobInfo(
            job=self.id, pid=self.child.pid, command=self.command, running=self.running,
            exit_code=self.exit_code, signal=self.signal, timed_out=self.timed_out,
            started_s=self.started_s, ended_s=self.ended_s,
            stdout_bytes=self.out.total, stderr_bytes=self.err.total,
        )

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class JobTable:
    def __init__(self, reaper: Reaper, max_running: int = MAX_RUNNING,
                 max_finished: int = MAX_FINISHED) -> None:
        self.reaper = reaper
        self.max_running = max_running
        self.max_finished = max_finished
        self.jobs: dict[int, Job] = {}
        self._next = 1

    def start(self, req: gp.JobStart, env_defaults: dict[str, str]) -> Job:
        if sum(j.running for j in self.jobs.values()) >= self.max_running:
            raise Failed(ErrorCode.LIMIT_EXCEEDED, f"{self.max_running} jobs already running")
        argv = command_argv(req)
        child = spawn(argv, req.cwd, merged_env(env_defaults, req.env), req.stdin, self.reaper)
        job = Job(
            id=self._next, child=child, command=command_summary(argv),
            out=RingBuffer(req.ring_bytes), err=RingBuffer(req.ring_bytes),
            started_s=kernel_uptime(),
        )
        self._next += 1
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, req.timeout_s))
        return job

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise Failed(ErrorCode.NOT_FOUND, f"no job {job_id}")
        return job

    async def _run(self, job: Job, timeout_s: float | None) -> None:
        child = job.child

        async def drain(fd: int, ring: RingBuffer) -> None:
            while data := await read_some(fd, 256 * 1024):
                ring.write(data)
                job.touch()

        pumps = asyncio.gather(drain(child.stdout, job.out), drain(child.stderr, job.err))
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    status = await asyncio.shield(child.exited)
            except TimeoutError:
                job.timed_out = True
                child.killpg()
                status = await asyncio.shield(child.exited)
            # Background leftovers may hold the pipes: give them a moment only.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(pumps)
        finally:
            pumps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumps
            child.close()
        job.exit_code, job.signal = decode_status(status)
        job.ended_s = kernel_uptime()
        job.touch()
        self._evict()

    def _evict(self) -> None:
        finished = [j for j in self.jobs.values() if not j.running]
        excess = len(finished) - self.max_finished
        if excess <= 0:
            return
        # Read ones first, then oldest (dicts keep insertion order).
        finished.sort(key=lambda j: (not j.drained, j.id))
        for j in finished[:excess]:
            del self.jobs[j.id]

    def forget(self, job_id: int) -> None:
        job = self.get(job_id)
        if job.running:
            raise Failed(ErrorCode.CONFLICT, f"job {job_id} is still running")
        del self.jobs[job_id]

    def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.running:
                job.child.killpg()


def _slice(ring: RingBuffer, offset: int, max_bytes: int) -> gp.OutputSlice:
    start, data, lost = ring.read(offset, max_bytes)
    return gp.OutputSlice(offset=start, data=data, lost=lost, total=ring.total)


async def handle_start(req: gp.JobStart, ctx: RequestContext) -> gp.JobStarted:
    job = ctx.state.jobs.start(req, ctx.state.env_defaults)
    return gp.JobStarted(id=req.id, job=job.id, pid=job.child.pid)


async def handle_poll(req: gp.JobPoll, ctx: RequestContext) -> gp.JobStatus:
    table = ctx.state.jobs
    job = table.get(req.job)
    if req.wait_s > 0 and job.running and job.out.total <= req.stdout_offset \
            and job.err.total <= req.stderr_offset:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(req.wait_s):
                await job.changed.wait()
    out = _slice(job.out, req.stdout_offset, req.max_bytes)
    err = _slice(job.err, req.stderr_offset, max(req.max_bytes - len(out.data), 0))
    if not job.running and out.offset + len(out.data) == out.total \
            and err.offset + len(err.data) == err.total:
        job.drained = True
    return gp.JobStatus(id=req.id, info=job.info(), stdout=out, stderr=err)


async def handle_kill(req: gp.JobKill, ctx: RequestContext) -> gp.Ok:
    job = ctx.state.jobs.get(req.job)
    if job.running:
        job.child.killpg(req.signal)
    return gp.Ok(id=req.id)


async def handle_list(req: gp.JobList, ctx: RequestContext) -> gp.JobListing:
    return gp.JobListing(id=req.id, jobs=[j.info() for j in ctx.state.jobs.jobs.values()])


async def handle_forget(req: gp.JobForget, ctx: RequestContext) -> gp.Ok:
    ctx.state.jobs.forget(req.job)
    return gp.Ok(id=req.id)


