"""Exceptions of the helper.  :class:`HelperError` is the root.

:class:`RequestFailed` is what a request handler raises to answer with a typed
error; the server turns it into an ``Error`` frame.  Anything else escaping a
handler is a bug in the helper and is answered as ``internal`` (and logged).
"""

from __future__ import annotations

from agentiso.protocol.errors import ErrorCode


class HelperError(Exception):
    """Root of the helper's own exceptions."""


class ConfigError(HelperError):
    """The helper's configuration file is unreadable or invalid (operator's fault)."""


class RequestFailed(HelperError):
    """A request cannot be served; ``code`` says whose fault it is."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")
