"""What snapshots may cost: per-uid counts and memory-state bytes, and the
free-space reserve of the state filesystem.

The checks are pure functions over numbers the caller gathered (under its
registry lock), so they are tested without a filesystem; :func:`free_bytes`
and :func:`file_bytes` are the two thin I/O edges.  Every refusal is a
``limit_exceeded`` :class:`QuotaExceeded` that names the limit, what is in
use and what the request would add, and says what to do.

A memory snapshot's size is only known once QEMU wrote it, so the check
counts the worst case: the VM's RAM plus :data:`MEMORY_STATE_SLACK` for the
device state (a TCG guest's file is usually far smaller: zero pages are
skipped).  The bytes counted afterwards are the files' real sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agentiso.protocol.errors import ErrorCode

from ..atomicfile import StateFilesystemFull, is_full
from .errors import StorageError

__all__ = [
    "MEMORY_STATE_SLACK", "QuotaExceeded", "SnapshotUse", "StateFilesystemFull",
    "check_reserve", "check_snapshot", "file_bytes", "free_bytes", "is_full",
    "memory_state_bound",
]

MIB = 1024 * 1024
#: Device state on top of the RAM a saved state may hold (QEMU 7.2, microvm:
#: ~70 KB measured; generous for a future device or two).
MEMORY_STATE_SLACK = 16 * MIB

class QuotaExceeded(StorageError):
    """A snapshot quota or the free-space reserve refuses a request (nothing was made)."""

    code = ErrorCode.LIMIT_EXCEEDED


@dataclass(frozen=True)
class SnapshotUse:
    """What one uid's snapshots cost now (in-progress ones included)."""

    snapshots: int = 0
    memory_bytes: int = 0


def memory_state_bound(memory_mib: int) -> int:
    """The most a saved state of a VM with ``memory_mib`` MiB of RAM may take."""
    return memory_mib * MIB + MEMORY_STATE_SLACK


def check_snapshot(
    use: SnapshotUse, *, max_snapshots: int, max_memory_bytes: int, memory_bytes: int = 0
) -> None:
    """Refuse one more snapshot (of ``memory_bytes`` saved state at most) over a quota.

    ``max_*`` of 0 means none are allowed (not "unlimited")."""
    if use.snapshots + 1 > max_snapshots:
        raise QuotaExceeded(
            f"limit reached: this would make {use.snapshots + 1} snapshots for this user, "
            f"the limit is {max_snapshots}; delete a snapshot first"
        )
    if memory_bytes and use.memory_bytes + memory_bytes > max_memory_bytes:
        raise QuotaExceeded(
            f"limit reached: saved VM memory of this user is {use.memory_bytes} bytes, this "
            f"snapshot may add up to {memory_bytes} (the VM's RAM), the limit is "
            f"{max_memory_bytes} bytes; delete a memory snapshot or take a disk-only one"
        )


def check_reserve(free: int, reserve: int, need: int = 0) -> None:
    """Refuse when the state filesystem would fall below its ``reserve`` of free bytes."""
    if free - need < reserve:
        extra = f" and this request may take {need} more" if need else ""
        raise QuotaExceeded(
            f"the helper's state filesystem has {free} bytes free{extra}, below its reserve "
            f"of {reserve} bytes: creates and snapshots are refused until the operator "
            "frees space (deleting snapshots or volumes frees some)"
        )


# --- I/O edges ----------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem.

    ``f_bavail`` (not ``f_bfree``): root's own reserved blocks are the last
    margin for the registry and must not count as room for snapshots."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def file_bytes(paths: list[Path]) -> int:
    """Total size of the files that exist among ``paths`` (apparent size: what a
    restore reads back)."""
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            continue
    return total
