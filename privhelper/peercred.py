"""Who is on the other end of a Unix socket, as the kernel says (SO_PEERCRED).

Authorization rests on these kernel facts only, never on the socket file's
permissions: a world-writable socket still refuses an outsider.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # pid, uid, gid
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    #: Supplementary groups of the peer at connect time (SO_PEERGROUPS).
    groups: frozenset[int]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def get_peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    size = 64 * 4
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            raise
        n = len(raw) // 4
        return frozenset(struct.unpack(f"{n}I", raw[: n * 4]))
    return frozenset()


def is_authorized(peer: PeerCredentials, allowed_gid: int | None) -> bool:
    """Root always; otherwise the peer must have ``allowed_gid`` as its primary
    or a supplementary group.  With no such group configured, only root."""
    if peer.is_root:
        return True
    if allowed_gid is None:
        return False
    return peer.gid == allowed_gid or allowed_gid in peer.groups
