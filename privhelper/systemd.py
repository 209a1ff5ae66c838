"""The two bits of the systemd protocol the helper needs, without libsystemd.

* socket activation: ``LISTEN_PID`` / ``LISTEN_FDS`` (fds start at 3);
* readiness: ``READY=1`` sent as a datagram to ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def listen_fds(env: Mapping[str, str] | None = None, pid: int | None = None) -> list[int]:
    """File descriptors passed by socket activation, or [] if none were passed
    to *this* process (LISTEN_PID must match)."""
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    try:
        if int(env.get("LISTEN_PID", "")) != pid:
            return []
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))


def clear_listen_env() -> None:
    """Keep child processes (QEMU) from believing the fds are theirs."""
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to NOTIFY_SOCKET; False if unset."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True
