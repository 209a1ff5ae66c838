"""Per-uid and host-wide hard limits (the helper's are for security; quotas
for sessions are the frontend's; see docs/helper.md, "Limits").

Pure: :func:`check` takes what a uid and the host already use and what a
request would add, and raises ``limit_exceeded`` naming the limit, before
anything is created.  Disk is counted by the volumes' virtual sizes (what
they may grow to), not by what they use today, so a limit cannot be overrun
by writing into a thin volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from agentiso.protocol.errors import ErrorCode

from .errors import RequestFailed

GiB = 1024**3


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    per_uid_vms: Annotated[int, Meta(ge=0, le=100_000)] = 8
    per_uid_memory_mib: Annotated[int, Meta(ge=0, le=2**30)] = 16 * 1024
    per_uid_disk_gib: Annotated[int, Meta(ge=0, le=2**30)] = 256
    per_uid_volumes: Annotated[int, Meta(ge=0, le=100_000)] = 64
    host_vms: Annotated[int, Meta(ge=0, le=100_000)] = 64
    host_memory_mib: Annotated[int, Meta(ge=0, le=2**30)] = 64 * 1024
    host_disk_gib: Annotated[int, Meta(ge=0, le=2**30)] = 2048


@dataclass(frozen=True)
class Usage:
    vms: int = 0
    memory_mib: int = 0
    disk_bytes: int = 0
    volumes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.vms + other.vms,
            self.memory_mib + other.memory_mib,
            self.disk_bytes + other.disk_bytes,
            self.volumes + other.volumes,
        )


def check(limits: LimitsConfig, uid_usage: Usage, host_usage: Usage, delta: Usage) -> None:
    """Raise ``RequestFailed(limit_exceeded)`` if ``delta`` would break a limit."""
    after_uid = uid_usage + delta
    after_host = host_usage + delta
    rules = [
        (delta.vms, after_uid.vms, limits.per_uid_vms, "VMs per user"),
        (delta.memory_mib, after_uid.memory_mib, limits.per_uid_memory_mib,
         "MiB of VM memory per user"),
        (delta.disk_bytes, after_uid.disk_bytes, limits.per_uid_disk_gib * GiB,
         "bytes of disk per user"),
        (delta.volumes, after_uid.volumes, limits.per_uid_volumes, "volumes per user"),
        (delta.vms, after_host.vms, limits.host_vms, "VMs on this host"),
        (delta.memory_mib, after_host.memory_mib, limits.host_memory_mib,
         "MiB of VM memory on this host"),
        (delta.disk_bytes, after_host.disk_bytes, limits.host_disk_gib * GiB,
         "bytes of disk on this host"),
    ]
    for added, total, limit, what in rules:
        if added > 0 and total > limit:
            raise RequestFailed(
                ErrorCode.LIMIT_EXCEEDED,
                f"limit reached: this would make {total} {what}, the limit is {limit}",
            )


#: What one connection may hold without the helper-wide total being checked
#: (its uid's share still is): the total can then be passed by at most this
#: much per connection (64 MiB at the default 1024 connections).
CONNECTION_FLOOR = 64 * 1024


class BufferBudget:
    """Bytes the helper holds for its clients (relay output queues, partial
    request frames), capped per uid and in total.

    The cap is what makes the helper's memory a budget instead of a function
    of its clients' behaviour: every byte buffered for a client is taken here
    first and given back when sent or dropped; a client whose buffers would
    pass its uid's share, or the total, is dropped instead (see
    docs/helper.md, "Connections and buffers").  Root is exempt: its buffers
    are the operator's own and must never be refused because of others.
    Pure bookkeeping, no I/O, no locks (one event loop).
    """

    def __init__(self, total: int, per_uid: int) -> None:
        if total < 0 or per_uid < 0:
            raise ValueError("buffer budgets cannot be negative")
        self.total = total
        self.per_uid = per_uid
        self.used = 0
        self._by_uid: dict[int, int] = {}

    def used_by(self, uid: int) -> int:
        return self._by_uid.get(uid, 0)

    def refusal(self, uid: int, n: int, check_total: bool = True) -> str | None:
        """Why ``uid`` may not hold ``n`` more bytes, or None if it may.
        ``check_total=False``: only the uid's share is checked (a
        connection's first :data:`CONNECTION_FLOOR` bytes, so that other
        users filling the total cannot keep anyone from saying hello)."""
        if uid == 0 or n <= 0:
            return None
        mine = self.used_by(uid) + n
        if mine > self.per_uid:
            return (f"uid {uid} would hold {mine} bytes of buffers, "
                    f"its share is {self.per_uid}")
        if check_total and self.used + n > self.total:
            return (f"the helper would hold {self.used + n} bytes of client "
                    f"buffers, its budget is {self.total}")
        return None

    def take(self, uid: int, n: int, check_total: bool = True) -> str | None:
        """Take ``n`` bytes for ``uid``; None on success, else why not (nothing taken)."""
        why = self.refusal(uid, n, check_total)
        if why is None and uid != 0 and n > 0:
            self.used += n
            self._by_uid[uid] = self.used_by(uid) + n
        return why

    def give_back(self, uid: int, n: int) -> None:
        if uid == 0 or n <= 0:
            return
        left = self.used_by(uid) - n
        if left < 0:
            raise ValueError(f"uid {uid} gives back more than it holds")
        self.used -= n
        if left:
            self._by_uid[uid] = left
        else:
            del self._by_uid[uid]


#: An unlimited budget, for code paths with no helper behind them (tests, tools).
def unlimited_budget() -> BufferBudget:
    return BufferBudget(total=2**62, per_uid=2**62)


def connection_refusal(
    uid: int, uid_open: int, others_open: int, max_total: int, max_per_uid: int
) -> str | None:
    """Why a new connection of ``uid`` is refused, or None to admit it.

    ``uid_open`` is what ``uid`` already has open, ``others_open`` what all
    non-root uids have.  Root is always admitted and never counted: however
    many connections one user opens, the operator can still get in.
    """
    if uid == 0:
        return None
    if uid_open >= max_per_uid:
        return (f"uid {uid} has {uid_open} connections open, the limit is {max_per_uid}: "
                "close some (or raise server.max_connections_per_uid)")
    if others_open >= max_total:
        return (f"the helper has {others_open} user connections open, the limit is "
                f"{max_total}: try again later (or raise server.max_connections)")
    return None


# --- the helper's unit: MemoryMax and TasksMax (systemd/agentiso-helper.service) -----------

#: The helper's own memory beyond its client buffers: the interpreter and its
#: modules, one task and socket per connection (at ``max_connections``), the
#: VMs' supervisors and channels.  Measured: 42-53 MiB idle with a VM, 51 MiB
#: holding 2,000 connections; this leaves room for the rest.
HELPER_BASE_MIB = 256
#: One QEMU beyond its guest's RAM (it runs in the helper's cgroup): the TCG
#: translation cache (tb_size_mib, 64 by default) and QEMU's own ~85 MiB RSS.
QEMU_OVERHEAD_MIB = 192
#: The helper's threads (anyio's worker threads, 40) and short-lived children
#: (qemu-img, nft, zfs).
HELPER_TASKS = 128
#: Threads of one QEMU: main loop, RCU and I/O helpers, up to 64 block-I/O
#: workers, and one per vCPU (up to 64).
QEMU_TASKS = 4 + 64 + 64


def helper_memory_budget_mib(buffer_budget_mib: int) -> int:
    """What the helper process itself may use: its base plus its client buffers."""
    return HELPER_BASE_MIB + buffer_budget_mib


def unit_memory_max_mib(limits: LimitsConfig, buffer_budget_mib: int) -> int:
    """The ``MemoryMax`` the unit needs: the helper's budget, and its VMs
    (which live in its cgroup) at the host limits, RAM and QEMU overhead."""
    vms = limits.host_memory_mib + limits.host_vms * QEMU_OVERHEAD_MIB
    return helper_memory_budget_mib(buffer_budget_mib) + vms


def unit_tasks_max(limits: LimitsConfig) -> int:
    """The ``TasksMax`` the unit needs for the helper and ``host_vms`` QEMUs."""
    return HELPER_TASKS + limits.host_vms * QEMU_TASKS
