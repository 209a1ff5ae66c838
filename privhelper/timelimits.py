"""Time limits of VMs, the pure part: which VM a limit ends next, when, and why.

Two clocks, each for what it is good at:

* a VM's lifetime counts from its start, a wall-clock time kept in the
  registry, so it survives a helper restart;
* its idle time counts from the last client activity, a monotonic time kept
  only in memory (on the VM's guest channel): after a helper restart it
  counts from the restart, which can only make a VM live longer, never end
  early.

A VM with a client request in flight (a long exec with no output) is not
idle, whatever its last activity: it is in use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agentiso.protocol import helper as hp

Limit = Literal["idle", "lifetime"]

#: The timer never sleeps longer than this, so a missed wake-up or a
#: wall-clock step delays a limit by at most this much.
MAX_SLEEP_S = 30.0


@dataclass(frozen=True)
class Watched:
    """What the timer knows of one running VM with limits."""

    key: str
    limits: hp.TimeLimits
    #: Wall clock (seconds since the epoch) of its start.
    started: float
    #: Monotonic time of its last activity.
    last_active: float
    #: A client request is in flight: in use, so not idle.
    busy: bool = False


@dataclass(frozen=True)
class Expiry:
    """Limit ``limit`` of VM ``key`` fires ``delay`` seconds from now (<= 0: due)."""

    key: str
    limit: Limit
    delay: float


def expiry(w: Watched, now_wall: float, now_mono: float) -> Expiry | None:
    """The first of ``w``'s limits to fire if nothing happens from now on
    (None: it has none).  On a tie the lifetime wins: it fires regardless."""
    found: Expiry | None = None
    if w.limits.lifetime_s is not None:
        found = Expiry(w.key, "lifetime", w.started + w.limits.lifetime_s - now_wall)
    if w.limits.idle_s is not None:
        since = now_mono if w.busy else min(w.last_active, now_mono)
        idle = Expiry(w.key, "idle", since + w.limits.idle_s - now_mono)
        if found is None or idle.delay < found.delay:
            found = idle
    return found


def next_expiry(
    watched: Iterable[Watched], now_wall: float, now_mono: float
) -> Expiry | None:
    """The earliest expiry among ``watched`` (None: no VM has a limit)."""
    best: Expiry | None = None
    for w in watched:
        e = expiry(w, now_wall, now_mono)
        if e is not None and (best is None or e.delay < best.delay):
            best = e
    return best


def sleep_for(e: Expiry | None) -> float:
    """How long the timer sleeps before looking again."""
    if e is None:
        return MAX_SLEEP_S
    return min(max(e.delay, 0.0), MAX_SLEEP_S)


def reason(limit: Limit, limits: hp.TimeLimits, destroyed: bool) -> str:
    """The text a client reads in ``VmInfo.reason``, e.g.
    ``idle for 600 s (time limit)``."""
    if limit == "idle":
        text = f"idle for {_seconds(limits.idle_s)} s"
    else:
        text = f"lifetime of {_seconds(limits.lifetime_s)} s reached"
    text += " (time limit)"
    return text + "; the VM and its volume were destroyed" if destroyed else text


def _seconds(s: float | None) -> str:
    return f"{s:g}" if s is not None else "?"
