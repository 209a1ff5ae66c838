"""What the agent holds across connections: children, jobs, defaults, timings."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .reaper import Reaper

if TYPE_CHECKING:
    from .jobs import JobTable
    from .system import Freezer


def kernel_uptime() -> float:
    """Seconds since the kernel booted (/proc/uptime), monotonic clock as fallback."""
    try:
        with open("/proc/uptime", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def init_t0_from_env() -> float | None:
    raw = os.environ.get("AGENTISO_INIT_T0")
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


#: Environment for commands when the agent was started with almost none (as PID 1).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


@dataclass
class AgentState:
    reaper: Reaper
    pid1: bool
    agent_start: float = field(default_factory=kernel_uptime)
    init_t0: float | None = field(default_factory=init_t0_from_env)
    listen: float | None = None
    #: Number of the current session.  Starts at a random value so a host can
    #: tell a restarted agent's sessions from those it knew.
    sessions: int = field(default_factory=lambda: int.from_bytes(os.urandom(3), "big") << 16)
    env_defaults: dict[str, str] = field(default_factory=lambda: dict(BASE_ENV))
    max_inflight: int = 64
    #: Set by a Shutdown request when the agent is not PID 1: stop serving.
    exit_requested: bool = False
    on_exit: Callable[[], None] | None = None
    _detached: set[asyncio.Task[None]] = field(default_factory=set)
    jobs: JobTable = field(init=False)
    freezer: Freezer = field(init=False)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a detached task until it ends."""
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    def __post_init__(self) -> None:
        from .jobs import JobTable
        from .system import Freezer

        self.jobs = JobTable(self.reaper)
        self.freezer = Freezer()
