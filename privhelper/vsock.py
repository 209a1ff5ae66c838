"""The vsock guest channel (docs/helper.md, "Guest channel"): used where ``/dev/vhost-vsock``
exists; elsewhere (these development machines) the channel is virtio-serial.

On vsock any local process can connect to a guest, so the agent demands a
per-VM secret, handed to the guest through fw_cfg at boot, before it says
anything (see :class:`~.relay.GuestChannel` ``secret``).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from collections.abc import Iterable

import anyio
from anyio.abc import SocketStream

from agentiso.protocol.guest_constants import AGENT_VSOCK_PORT

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


def pick_cid(taken: Iterable[int]) -> int:
    """The lowest guest CID no VM of this helper uses."""
    used = set(taken)
    cid = FIRST_CID
    while cid in used:
        cid += 1
    if cid > LAST_CID:
        raise OverflowError("no guest CID left")
    return cid


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
