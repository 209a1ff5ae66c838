"""Accepting connections without ever dying of it.

anyio's ``SocketListener.serve`` ends (and with it the helper's server) on the
first error ``accept`` raises.  Some of those are the host, not the listener:
out of file descriptors (``EMFILE`` for the process, ``ENFILE`` for the
host), out of kernel memory, a peer gone before we took it.  Here each of
those is logged (at most once a second) and waited out, and the listener
goes on; only its closing ends the loop.

Out of descriptors, the pending connection would stay in the backlog, its
client hanging, and the listener would stay readable, so the loop would spin:
a spare descriptor (on ``/dev/null``) is held for that moment, closed to take
the connection, answered with a short refusal and closed, and opened again
(the classic "reserve fd" of libev and nginx).

The descriptor limit itself is raised at start (:func:`raise_nofile_limit`):
the soft limit of a service is often 1024, far below the connections the
helper is configured to admit plus its VMs' sockets.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream

log = structlog.get_logger("agentiso.helper.accept")

#: Pause after a failed accept before trying again (the loop must not spin).
ACCEPT_RETRY_S = 0.05
#: Errors of accept that say "not now", never "this listener is broken".
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
#: Pending connections refused per round while out of descriptors.
REFUSE_PER_ROUND = 64
#: The soft descriptor limit the helper asks for (capped by the hard limit).
WANTED_NOFILE = 65536


def raise_nofile_limit(wanted: int = WANTED_NOFILE) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard
    limit, never lowered); returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    return soft, hard


class _Spare:
    """One descriptor kept in reserve for refusing a connection when none are left."""

    def __init__(self) -> None:
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        if self.fd < 0:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = -1  # taken meanwhile: tried again after the next refusal

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _refuse_one(raw: socket.socket, spare: _Spare, refusal: bytes) -> bool:
    """Take one pending connection with the spare descriptor, send it
    ``refusal`` (a few bytes: they fit any fresh socket buffer) and close it."""
    spare.close()
    try:
        conn, _ = raw.accept()
    except OSError:  # nothing pending, or still no descriptor
        return False
    finally:
        spare.reopen()
    with conn:
        conn.setblocking(False)
        try:
            conn.send(refusal)
        except OSError:
            pass  # the client is gone already: nothing to tell it
    return True


async def accept_forever(
    listener: SocketListener,
    handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
    refusal: bytes,
) -> None:
    """Serve ``listener`` until it is closed or the caller is cancelled,
    each connection in its own task running ``handle``.  ``refusal`` is
    sent to a connection that arrives when no descriptor is left."""
    raw = listener.extra(SocketAttribute.raw_socket)
    spare = _Spare()
    last_logged = 0.0
    refused = 0
    try:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    return
                except (anyio.BrokenResourceError, OSError) as exc:
                    # anyio wraps accept's OSError in BrokenResourceError.
                    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
                    code = getattr(cause, "errno", None) or 0
                    if code in OUT_OF_DESCRIPTORS:
                        # Refuse what is pending now (bounded), rather than leave it hanging.
                        for _ in range(REFUSE_PER_ROUND):
                            if not _refuse_one(raw, spare, refusal):
                                break
                            refused += 1
                    now = time.monotonic()
                    if now - last_logged >= 1.0:
                        last_logged = now
                        log.warning(
                            "accept_failed", error=os.strerror(code) if code else str(cause),
                            refused_since_last=refused,
                            effect="waiting; the server goes on",
                            fix="raise LimitNOFILE, or lower server.max_connections",
                        )
                        refused = 0
                    await anyio.sleep(ACCEPT_RETRY_S)
                    continue
                tg.start_soon(handle, stream)
    finally:
        spare.close()
