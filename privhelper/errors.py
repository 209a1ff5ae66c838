"""Exceptions of the helper: one root, :class:`HelperError`, that carries its wire code.

Every exception the helper raises on purpose is a :class:`HelperError`.  Its
``code`` (an :class:`~agentiso.protocol.errors.ErrorCode`) says whose fault it
is, and ``message`` is what a client may read.  A subclass fixes the code as a
class attribute (``code = ErrorCode.NOT_FOUND``); :class:`RequestFailed` takes
it per instance, for one-off refusals in request handlers.  The server answers
any of them with an ``Error`` frame carrying ``code`` and ``message`` (an
``internal`` one is logged and answered with a generic text).  Anything else
escaping a handler is a bug in the helper and is answered as ``internal``.

Errors a *guest* reported are never passed off as the helper's own: a step the
helper ran in a guest's agent that failed there is :class:`GuestStepFailed`
(wire code ``guest_failed``), whose message carries the guest's code and text.
"""

from __future__ import annotations

from agentiso.protocol.errors import ErrorCode


class HelperError(Exception):
    """Root of the helper's own exceptions: a wire ``code`` and a client-readable ``message``."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(message)


class ConfigError(HelperError):
    """The helper's configuration file is unreadable or invalid (operator's fault)."""


class RequestFailed(HelperError):
    """A request cannot be served; the raise site says with which ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code)


class GuestStepFailed(HelperError):
    """A step the helper ran in a guest's agent failed there (the guest's own answer).

    Neither the client's fault nor the helper's: the wire code is
    ``guest_failed``, whatever code the guest gave (kept in ``guest_code``).
    """

    code = ErrorCode.GUEST_FAILED

    def __init__(self, step: str, guest_code: str, guest_message: str) -> None:
        self.step = step
        self.guest_code = guest_code
        self.guest_message = guest_message
        super().__init__(f"the guest failed {step}: [{guest_code}] {guest_message}")
