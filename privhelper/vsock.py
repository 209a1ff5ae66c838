"""The vsock guest channel (docs/helper.md, "Guest channel"): used where ``/dev/vhost-vsock``
exists; elsewhere (these development machines) the channel is virtio-serial.

On vsock any local process can connect to a guest, so the agent demands a
per-VM secret, handed to the guest through fw_cfg at boot, before it says
anything (see :class:`~.relay.GuestChannel` ``secret``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
import struct
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import SocketStream

from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.guest_constants import AGENT_VSOCK_PORT

from .errors import HelperError

VHOST_VSOCK = "/dev/vhost-vsock"
#: CIDs 0-2 are reserved (hypervisor, loopback, host).
FIRST_CID = 3
LAST_CID = 0xFFFFFFFE
#: The secret the helper makes per VM (within the agent's bounds; a test checks).
SECRET_BYTES = 32


def available(path: str = VHOST_VSOCK) -> bool:
    return os.path.exists(path)


def secret_for(saved_hex: str | None) -> bytes:
    """The secret a VM's agent will demand: when the VM resumes saved memory,
    the one that memory's agent read at its boot (it never reads fw_cfg
    again), else a fresh one."""
    if saved_hex:
        return bytes.fromhex(saved_hex)
    return secrets.token_bytes(SECRET_BYTES)


#: How many CIDs :func:`pick_cid` tries that the kernel says are in use
#: (another hypervisor, another helper) before it gives up.
MAX_CID_TRIES = 64
#: ``_IOW(VHOST_VIRTIO, 0x60, __u64)`` from <linux/vhost.h>.
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60


class CidUnavailable(HelperError):
    """No guest CID could be had: other hypervisors on the host hold them."""

    code = ErrorCode.UNAVAILABLE


def set_guest_cid(fd: int, cid: int) -> bool:
    """Give the vhost-vsock device ``fd`` the guest CID ``cid``; False if the
    kernel says another VM on the host (of any hypervisor) has it.  Setting
    the same CID again on the same fd, as QEMU then does, succeeds."""
    try:
        fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def cid_free_in_kernel(cid: int, device: str = VHOST_VSOCK) -> bool:
    """Whether the kernel would give ``cid`` to a new VM now: claimed on a
    scratch fd of the device, released when it closes.  Without the device no
    VM can hold a CID."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        return set_guest_cid(fd, cid)
    finally:
        os.close(fd)


def pick_cid(
    taken: Iterable[int],
    *,
    first: int = FIRST_CID,
    last: int = LAST_CID,
    free_in_kernel: Callable[[int], bool] = cid_free_in_kernel,
) -> int:
    """The lowest CID in ``first..last`` that no VM of this helper uses
    (``taken``) and the kernel does not report in use (EADDRINUSE: another
    hypervisor has it); up to :data:`MAX_CID_TRIES` such refusals.

    Between this probe and QEMU's start another process could take the CID:
    the engine claims it on the VM's own device fd before QEMU runs, and a
    lost race is a typed error of that start."""
    used = set(taken)
    refused = 0
    cid = max(first, FIRST_CID)
    while cid <= min(last, LAST_CID):
        if cid not in used:
            if free_in_kernel(cid):
                return cid
            refused += 1
            if refused >= MAX_CID_TRIES:
                break
        cid += 1
    raise CidUnavailable(
        f"no free vsock guest CID in {first}-{last} ({refused} held by other VMs on the host); "
        "stop some VMs, then start this one again"
    )


async def connect(cid: int, port: int = AGENT_VSOCK_PORT) -> SocketStream:
    """Connect to ``port`` of guest ``cid``; OSError if it cannot be reached."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((cid, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        if err:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        return await SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise
