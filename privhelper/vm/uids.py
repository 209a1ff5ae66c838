"""Per-VM unprivileged uids.

Each QEMU runs under its own uid (and a gid of the same number) taken from a
configured range of ids that no account uses.  A compromised QEMU then cannot
signal, ptrace or read the files of another VM's QEMU, which a shared system
user would allow.  The allocator is pure: the engine tells it which uids are
taken (records, live processes) and which are unusable (known accounts).
"""

from __future__ import annotations

import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import InvalidVmSpec, VmLimitExceeded


@dataclass(frozen=True)
class UidRange:
    base: int
    count: int

    def __post_init__(self) -> None:
        if self.base < 1000 or self.count < 1 or self.base + self.count > 2**32 - 2:
            raise InvalidVmSpec(
                f"uid range {self.base}+{self.count} must lie within [1000, 2^32-2)"
            )

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.base <= uid < self.base + self.count


def allocate_uid(
    rng: UidRange, taken: Iterable[int], usable: Callable[[int], bool] = lambda _: True
) -> int:
    """The lowest uid of ``rng`` not in ``taken`` for which ``usable`` holds."""
    busy = set(taken)
    for uid in range(rng.base, rng.base + rng.count):
        if uid not in busy and usable(uid):
            return uid
    raise VmLimitExceeded(f"no free uid left in {rng.base}..{rng.base + rng.count - 1}")


def uid_unassigned(uid: int) -> bool:
    """A uid no account uses (the password database says; a uid from the
    range must not be anyone's).  The allocator's default ``usable`` test."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False
