"""Exceptions of the guest agent.  :class:`GuestError` is the root.

A handler raises :class:`Failed` to answer its request with a typed error; the
connection turns it into an ``Error`` frame.  :func:`from_oserror` maps the
errno of a failed system call onto the wire's error codes, so "no such file"
is ``not_found`` whichever handler hit it.  Anything else escaping a handler is
a bug, logged and answered as ``internal``.
"""

from __future__ import annotations

import errno

from agentiso.protocol.errors import ErrorCode


class GuestError(Exception):
    """Root of the agent's own exceptions."""


class Failed(GuestError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")


class ChannelClosed(GuestError):
    """The host side of the channel went away."""


_ERRNO_CODES: dict[int, ErrorCode] = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.ENOTDIR: ErrorCode.INVALID,
    errno.EISDIR: ErrorCode.INVALID,
    errno.EINVAL: ErrorCode.INVALID,
    errno.ENAMETOOLONG: ErrorCode.INVALID,
    errno.ELOOP: ErrorCode.INVALID,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.EROFS: ErrorCode.PERMISSION_DENIED,
    errno.EEXIST: ErrorCode.ALREADY_EXISTS,
    errno.ENOTEMPTY: ErrorCode.CONFLICT,
    errno.EBUSY: ErrorCode.CONFLICT,
    errno.ETXTBSY: ErrorCode.CONFLICT,
    errno.ENOSPC: ErrorCode.LIMIT_EXCEEDED,
    errno.EDQUOT: ErrorCode.LIMIT_EXCEEDED,
    errno.EMFILE: ErrorCode.LIMIT_EXCEEDED,
    errno.ENFILE: ErrorCode.LIMIT_EXCEEDED,
    errno.EFBIG: ErrorCode.TOO_LARGE,
    errno.E2BIG: ErrorCode.TOO_LARGE,
    errno.ENOEXEC: ErrorCode.INVALID,
    errno.ETIMEDOUT: ErrorCode.TIMEOUT,
    errno.ESRCH: ErrorCode.NOT_FOUND,
}


def from_oserror(exc: OSError, what: str = "") -> Failed:
    """The typed error for a failed system call (``what``: the object, e.g. a path)."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.INTERNAL)
    text = exc.strerror or str(exc)
    return Failed(code, f"{what}: {text}" if what else text)
