"""The one place that collects child exit statuses.

The agent runs its commands itself (``subprocess.Popen`` for the fork/exec and
its own pipes, never asyncio's subprocess layer) so that exactly one piece of
code calls ``waitpid``.  As PID 1 it must reap every zombie, including
orphans reparented to it, so it waits on ``-1``; asyncio's child watcher doing
its own ``waitpid(pid)`` at the same time would race it for statuses.  When the
agent is not PID 1 (tests, benchmarks) it waits only for the pids it spawned,
so it never steals a status from the process hosting it.

Wake-ups come from SIGCHLD (through the event loop) when the loop can install
a handler, plus a periodic sweep as a safety net.  Reaping happens only in
event-loop callbacks and ``watch`` is called in the same loop turn as the
spawn, so a child cannot be reaped before it is watched; statuses of strangers
(orphans) are therefore dropped, never kept for a pid that may be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

log = logging.getLogger("agentiso.guest.reaper")


def decode_status(status: int) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` of a raw waitpid status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


class Reaper:
    def __init__(self, reap_all: bool, sweep_interval: float = 1.0) -> None:
        self.reap_all = reap_all
        self.sweep_interval = sweep_interval
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._signal_installed = False
        self.reaped_strangers = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
            self._signal_installed = True
        except (RuntimeError, ValueError):
            # Not the main thread: sweeping faster makes up for the missing signal.
            self.sweep_interval = min(self.sweep_interval, 0.02)
        self._sweeper = self._loop.create_task(self._sweep())

    def stop(self) -> None:
        if self._signal_installed and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGCHLD)
            self._signal_installed = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s raw exit status.  Call right after spawning,
        in the loop thread (the SIGCHLD callback cannot run in between)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._waiting[pid] = fut
        # The child may already be gone; don't wait for the next signal.
        loop.call_soon(self.reap)
        return fut

    def reap(self) -> None:
        """Collect every exited child we are responsible for, without blocking."""
        if self.reap_all:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                self._deliver(pid, status)
        else:
            for pid in list(self._waiting):
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    # Someone else reaped it; report a generic failure.
                    self._deliver(pid, 255 << 8)
                    continue
                if got == pid:
                    self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        fut = self._waiting.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(status)
            return
        self.reaped_strangers += 1

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.reap()
            except Exception:
                log.exception("reap sweep failed")
