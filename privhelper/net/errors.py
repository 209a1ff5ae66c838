"""Errors of the networking layer.

:class:`NetError` is a :class:`~agentiso.privhelper.errors.HelperError`, so a
handler that lets one escape answers the client with its typed ``code`` and
message.  The subclasses fix the code (one may be given per instance), so
callers and tests can tell the cases apart.
"""

from __future__ import annotations

from agentiso.protocol.errors import ErrorCode

from ..errors import HelperError


class NetError(HelperError):
    """Root of the networking layer's errors; ``code`` says whose fault it is."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidNetInput(NetError):
    """A name, address, CIDR, port or policy is malformed or out of range."""

    code = ErrorCode.INVALID


class NetConfigError(InvalidNetInput):
    """The operator's network configuration is invalid."""


class PoolExhausted(NetError):
    """No free address is left in the subnet."""

    code = ErrorCode.LIMIT_EXCEEDED


class PortUnavailable(NetError):
    """A host port is taken (by a forward or by a listening socket)."""

    code = ErrorCode.CONFLICT


class WorkspaceNotFound(NetError):
    code = ErrorCode.NOT_FOUND


class NetConflict(NetError):
    """The request clashes with existing state (owner mismatch, TAP busy, ...)."""

    code = ErrorCode.CONFLICT


class NetSystemError(NetError):
    """The host refused a network operation (nft, netlink, /dev/net/tun)."""

    code = ErrorCode.INTERNAL


class StateCorrupt(NetError):
    """The persisted network state cannot be read back; nothing is guessed."""

    code = ErrorCode.INTERNAL
