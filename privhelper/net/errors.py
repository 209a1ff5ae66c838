"""Errors of the networking layer.

:class:`NetError` derives from :class:`~agentiso.privhelper.errors.RequestFailed`
(itself a :class:`~agentiso.privhelper.errors.HelperError`), so a handler that
lets one escape answers the client with its typed ``code`` and message.  The
subclasses fix the code, so callers and tests can tell the cases apart.
"""

from __future__ import annotations

from agentiso.protocol.errors import ErrorCode

from ..errors import RequestFailed


class NetError(RequestFailed):
    """Root of the networking layer's errors; ``code`` says whose fault it is."""

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(code if code is not None else self.default_code, message)


class InvalidNetInput(NetError):
    """A name, address, CIDR, port or policy is malformed or out of range."""

    default_code = ErrorCode.INVALID


class NetConfigError(InvalidNetInput):
    """The operator's network configuration is invalid."""


class PoolExhausted(NetError):
    """No free address is left in the subnet."""

    default_code = ErrorCode.LIMIT_EXCEEDED


class PortUnavailable(NetError):
    """A host port is taken (by a forward or by a listening socket)."""

    default_code = ErrorCode.CONFLICT


class WorkspaceNotFound(NetError):
    default_code = ErrorCode.NOT_FOUND


class NetConflict(NetError):
    """The request clashes with existing state (owner mismatch, TAP busy, ...)."""

    default_code = ErrorCode.CONFLICT


class NetSystemError(NetError):
    """The host refused a network operation (nft, netlink, /dev/net/tun)."""

    default_code = ErrorCode.INTERNAL


class StateCorrupt(NetError):
    """The persisted network state cannot be read back; nothing is guessed."""

    default_code = ErrorCode.INTERNAL
