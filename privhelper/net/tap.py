"""Adapter: TAP devices opened through ``/dev/net/tun``.

:func:`open_tap` creates a *non-persistent* TAP: it exists exactly as long as
some process holds an fd of it.  The helper opens it, hands the fd to QEMU
(``-netdev tap,fd=N``) and closes its own copy; from then on the TAP lives and
dies with QEMU.  That is why a helper restart loses nothing (QEMU still holds
the fd, the TAP and its bridge membership stay) and why a crashed QEMU leaves no
TAP behind.  After a restart the helper does not need the fd back: it only
re-applies the ruleset, which refers to TAPs by name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from agentiso.protocol.errors import ErrorCode

from .errors import NetConflict, NetSystemError
from .model import check_ifname

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(name: str, vnet_hdr: bool = True) -> int:
    """Create TAP ``name`` and return its fd (close-on-exec; pass it with ``pass_fds``).

    Raises :class:`NetConflict` when a TAP of that name is already held by
    another fd (e.g. a running QEMU), :class:`NetSystemError` otherwise.
    """
    check_ifname(name)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetSystemError(
            f"cannot open {TUN_DEVICE}: {exc.strerror}", ErrorCode.UNAVAILABLE
        ) from None
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise NetConflict(f"TAP {name} is held by another process") from None
        raise NetSystemError(f"TUNSETIFF {name}: {exc.strerror}") from None
    return fd
