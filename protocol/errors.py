"""The error model shared by every hop.

Two families live here, both under :class:`ProtocolError`:

* Local failures to speak the protocol (a frame too large, bytes that are not a
  valid message, a version mismatch).  These mean *the peer* misbehaved, or we
  are talking to the wrong program.
* :class:`RemoteError` and its subclasses: the peer understood us and answered
  with a typed error (``code``, ``message``).  The subclass says whose fault it
  is: :class:`InvalidRequest` is the caller's, :class:`InternalError` is the
  server's, :class:`NotFound`/:class:`Conflict`/... are about the world.

On the wire an error is always ``ErrorCode`` + message, never a traceback.
"""

from __future__ import annotations

import enum


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


class ProtocolError(Exception):
    """Root of every exception raised by :mod:`agentiso.protocol`."""


class FramingError(ProtocolError):
    """The byte stream does not follow the framing rules."""


class FrameTooLarge(FramingError):
    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        shown = "unknown" if length < 0 else str(length)
        super().__init__(f"frame of {shown} bytes exceeds the limit of {limit} bytes")


class TruncatedFrame(FramingError):
    def __init__(self, pending: int) -> None:
        self.pending = pending
        super().__init__(f"stream ended inside a frame ({pending} bytes pending)")


class DecodeError(ProtocolError):
    """A frame body is not a valid message of the expected union."""


class VersionMismatch(ProtocolError):
    def __init__(self, ours: int, theirs: int) -> None:
        self.ours = ours
        self.theirs = theirs
        super().__init__(f"protocol version mismatch: we speak {ours}, peer speaks {theirs}")


class RemoteError(ProtocolError):
    """The peer answered a request with a typed error."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"[{self.code}] {message}")


class InvalidRequest(RemoteError):
    code = ErrorCode.INVALID


class RemoteProtocolError(RemoteError):
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
        RemoteProtocolError,
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
