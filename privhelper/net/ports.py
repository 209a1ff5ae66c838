"""Adapter: is a host port free?  Decided by trying to bind it.

A DNAT forward steals the port from any local service, so a forward is refused
for a port something already listens on.  ``SO_REUSEADDR`` keeps sockets in
TIME_WAIT from counting as "in use"; a listening socket still makes bind fail,
including one bound to a single address such as 127.0.0.1.
"""

from __future__ import annotations

import errno
import socket

from .errors import NetSystemError


def port_is_free(port: int, protocol: str) -> bool:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise NetSystemError(f"cannot probe port {protocol}/{port}: {exc}") from None
    return True
