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
