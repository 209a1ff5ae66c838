"""Transport exceptions, mapped once at each boundary.

A byte stream whose peer went away fails with one of several exceptions,
depending on who noticed first: anyio's ``BrokenResourceError``,
``ClosedResourceError`` or ``EndOfStream``, or an ``OSError`` from the kernel
(``ConnectionResetError``, ``BrokenPipeError``, ...).  Code above a boundary
should not have to know that list.  Each boundary (a client connection, the
guest channel, QMP) therefore either maps these to one typed error with
:func:`~agentiso.protocol.errors.map_exceptions` (the way httpcore maps
socket errors; :func:`peer_gone` is the common case), or, where a gone
peer is simply the end (a reader at EOF, a writer whose reader will notice),
uses :func:`receive_some` / :func:`peer_gone_is_eof`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
from anyio.abc import ByteReceiveStream

from agentiso.protocol.errors import ErrorCode, map_exceptions

from .errors import HelperError

#: Every way a byte stream says its peer is gone (or the stream was closed under us).
STREAM_GONE: tuple[type[Exception], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)

class PeerGone(HelperError):
    """The other end of a connection went away (or broke it) mid-conversation."""

    code = ErrorCode.UNAVAILABLE


def peer_gone(what: str) -> contextlib.AbstractContextManager[None]:
    """Map a broken stream to :class:`PeerGone` naming ``what`` broke."""
    return map_exceptions({STREAM_GONE: lambda exc: PeerGone(f"{what}: {_describe(exc)}")})


@contextlib.contextmanager
def peer_gone_is_eof() -> Iterator[None]:
    """For a writer whose peer's departure is noticed (and handled) by the reader."""
    with contextlib.suppress(*STREAM_GONE):
        yield


async def receive_some(stream: ByteReceiveStream, max_bytes: int = 65536) -> bytes:
    """The next bytes from ``stream``; ``b""`` once the peer is gone for any reason."""
    try:
        return await stream.receive(max_bytes)
    except STREAM_GONE:
        return b""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
