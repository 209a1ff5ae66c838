"""Is a QEMU using this image?  Asked the way QEMU itself asks.

QEMU's file and host_device drivers hold byte-range locks on every image they
open (bytes 100.. for the permissions a user holds, 200.. for those it does
not share; see QEMU's ``raw_apply_lock_bytes``).  A POSIX ``F_GETLK`` over that
range conflicts with those OFD locks, so it tells, without taking any lock and
without spawning qemu-img, whether some QEMU has the image open.  Works for
qcow2 and raw files and block devices alike.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

_LOCK_START = 100
_LOCK_LEN = 200
# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding).
_FLOCK = "hhqqi4x"


def image_in_use(path: Path) -> bool:
    """True if another process holds a QEMU image lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _LOCK_START, _LOCK_LEN, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        lock_type: int = struct.unpack(_FLOCK, answer)[0]
        return lock_type != fcntl.F_UNLCK
    finally:
        os.close(fd)
