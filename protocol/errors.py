"""The error model shared by every hop.

Every exception :mod:`agentiso.protocol` raises derives from :class:`WireError`,
so "anything from the protocol package" is one name to catch.  Below it, two
branches that say whose fault a failure is, in the way of h11:

* :class:`ProtocolError`: the conversation itself broke the protocol's rules.
  Its two sides say who broke them:

  - :class:`RemoteProtocolError`: *the peer* did (a frame too large, bytes that
    are not a valid message, a truncated stream, a version we do not speak, an
    answer of the wrong type).  Drop or resynchronise the connection.
  - :class:`LocalProtocolError`: *we* did (a message too large to send, a
    request built with out-of-range fields): a bug or a caller's bad input,
    found before anything went on the wire.

* :class:`RemoteError` and its subclasses: the peer understood us and answered
  with a typed error (``code``, ``message``).  The subclass says whose fault it
  is: :class:`InvalidRequest` is the caller's, :class:`InternalError` is the
  server's, :class:`NotFound`/:class:`Conflict`/... are about the world.  A
  typed answer is not a protocol violation: the conversation goes on.

On the wire an error is always ``ErrorCode`` + message, never a traceback.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager


class ErrorCode(enum.StrEnum):
    """Every error code that may cross a wire."""

    # The request is malformed or out of bounds: the caller's fault.
    INVALID = "invalid"
    # Framing or message-level violation; the connection is usually closed.
    PROTOCOL = "protocol"
    VERSION_MISMATCH = "version_mismatch"
    # Who you are does not allow this.
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    # The object is in a state that does not allow the operation (e.g. busy, has dependents).
    CONFLICT = "conflict"
    LIMIT_EXCEEDED = "limit_exceeded"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    # A component needed for this is not available (VM down, channel dropped, ...).
    UNAVAILABLE = "unavailable"
    # The operation was cancelled (e.g. connection lost mid-way).
    CANCELLED = "cancelled"
    # The server failed: a bug or an unexpected environment problem.
    INTERNAL = "internal"
    # A step the helper ran in the guest agent failed there (the guest's own
    # answer, e.g. no NIC with the expected MAC): neither the caller's fault
    # nor the helper's.  The message carries the guest's code and text.
    GUEST_FAILED = "guest_failed"


class WireError(Exception):
    """Root of every exception raised by :mod:`agentiso.protocol`."""


# --- the conversation broke the rules ----------------------------------------------------


class ProtocolError(WireError):
    """The conversation broke the protocol's rules (not a typed answer).

    Raise one of the two sides; a bare ProtocolError is kept for callers that
    cannot tell who broke the rules.
    """


class LocalProtocolError(ProtocolError):
    """We broke the rules: caught before sending, so nothing went on the wire."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the rules: what it sent is not the protocol we speak."""


class OversizeMessage(LocalProtocolError):
    """A message we were about to send is larger than the frame limit."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"message of {length} bytes exceeds the frame limit of {limit} bytes")


class FramingError(RemoteProtocolError):
    """The received byte stream does not follow the framing rules."""


class FrameTooLarge(FramingError):
    """A received length prefix is above the limit (checked before the body is read)."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        shown = "unknown" if length < 0 else str(length)
        super().__init__(f"frame of {shown} bytes exceeds the limit of {limit} bytes")


class TruncatedFrame(FramingError):
    def __init__(self, pending: int) -> None:
        self.pending = pending
        super().__init__(f"stream ended inside a frame ({pending} bytes pending)")


class DecodeError(RemoteProtocolError):
    """A received frame body is not a valid message of the expected union."""


class VersionMismatch(RemoteProtocolError):
    """The peer greeted us with a protocol version we do not speak."""

    def __init__(self, ours: int, theirs: int) -> None:
        self.ours = ours
        self.theirs = theirs
        super().__init__(f"protocol version mismatch: we speak {ours}, peer speaks {theirs}")


class UnexpectedMessage(RemoteProtocolError):
    """A valid message, but not one the conversation allows here (e.g. a
    reply of the wrong type)."""

    def __init__(self, expected: str, got: object) -> None:
        self.expected = expected
        self.got = type(got).__name__
        super().__init__(f"expected {expected}, got {self.got}")


# --- the peer's typed answers ------------------------------------------------------------


class RemoteError(WireError):
    """The peer answered a request with a typed error."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"[{self.code}] {message}")


class InvalidRequest(RemoteError):
    code = ErrorCode.INVALID


class ProtocolViolation(RemoteError):
    """The peer says *we* broke the protocol (``Error(code=protocol)``)."""

    code = ErrorCode.PROTOCOL


class RemoteVersionMismatch(RemoteError):
    code = ErrorCode.VERSION_MISMATCH


class PermissionDenied(RemoteError):
    code = ErrorCode.PERMISSION_DENIED


class NotFound(RemoteError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(RemoteError):
    code = ErrorCode.ALREADY_EXISTS


class Conflict(RemoteError):
    code = ErrorCode.CONFLICT


class LimitExceeded(RemoteError):
    code = ErrorCode.LIMIT_EXCEEDED


class TooLarge(RemoteError):
    code = ErrorCode.TOO_LARGE


class RemoteTimeout(RemoteError):
    code = ErrorCode.TIMEOUT


class Unavailable(RemoteError):
    code = ErrorCode.UNAVAILABLE


class Cancelled(RemoteError):
    code = ErrorCode.CANCELLED


class InternalError(RemoteError):
    code = ErrorCode.INTERNAL


class GuestFailed(RemoteError):
    code = ErrorCode.GUEST_FAILED


_BY_CODE: dict[ErrorCode, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ProtocolViolation,
        RemoteVersionMismatch,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        Conflict,
        LimitExceeded,
        TooLarge,
        RemoteTimeout,
        Unavailable,
        Cancelled,
        InternalError,
        GuestFailed,
    )
}


def remote_error(code: ErrorCode | str, message: str) -> RemoteError:
    """Build the exception for an error received from a peer.

    An unknown code (a newer peer) becomes a plain :class:`RemoteError` that
    keeps the code text in its message rather than being lost.
    """
    try:
        ec = ErrorCode(code)
    except ValueError:
        return InternalError(f"unknown error code {code!r}: {message}")
    return _BY_CODE[ec](message)


# --- mapping a transport's exceptions, once per boundary ---------------------------------

ExceptionMap = Mapping[
    type[BaseException] | tuple[type[BaseException], ...],
    type[Exception] | Callable[[BaseException], Exception],
]


@contextmanager
def map_exceptions(mapping: ExceptionMap) -> Iterator[None]:
    """Translate a transport's exceptions into ours at one boundary (httpcore's
    ``map_exceptions``): the first key that matches wins; the new exception is
    built from the old one (``factory(exc)``, or ``cls(str(exc))`` for a class)
    and chained to it.  Anything unmatched passes through unchanged.

        with map_exceptions({(BrokenPipeError, ConnectionResetError): ChannelClosed}):
            os.write(fd, data)
    """
    try:
        yield
    except BaseException as exc:
        for match, target in mapping.items():
            if isinstance(exc, match):
                if isinstance(target, type):
                    raise target(str(exc)) from exc
                raise target(exc) from exc
        raise
