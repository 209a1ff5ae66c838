"""Typed errors of the VM engine.

Every exception derives from :class:`VmError`, itself a
:class:`~agentiso.privhelper.errors.HelperError`: each subclass fixes its wire
``code``, so the server answers with a typed error without knowing the
engine's classes.
"""

from __future__ import annotations

from agentiso.privhelper.errors import HelperError
from agentiso.protocol.errors import ErrorCode


class VmError(HelperError):
    """Root of the VM engine's errors."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidVmSpec(VmError):
    """A spec or argument is malformed or out of bounds (the caller's fault)."""

    code = ErrorCode.INVALID


class VmNotFound(VmError):
    code = ErrorCode.NOT_FOUND


class VmAlreadyExists(VmError):
    code = ErrorCode.ALREADY_EXISTS


class VmStateConflict(VmError):
    """The VM is not in a state that allows the operation (e.g. not running)."""

    code = ErrorCode.CONFLICT


class VmUnavailable(VmError):
    """QEMU, QMP or a needed host facility is not there (VM gone, socket down)."""

    code = ErrorCode.UNAVAILABLE


class VmTimeout(VmError):
    code = ErrorCode.TIMEOUT


class VmLimitExceeded(VmError):
    """No free resource left (e.g. the per-VM uid range is exhausted)."""

    code = ErrorCode.LIMIT_EXCEEDED


class QmpError(VmError):
    """QEMU answered a QMP command with an error, or QMP broke mid-command."""

    code = ErrorCode.INTERNAL


class LaunchError(VmError):
    """QEMU could not be started or died during start-up (stderr tail attached)."""

    code = ErrorCode.INTERNAL


class UnprivilegedImpossible(VmError):
    """QEMU cannot be run as an unprivileged uid here; we refuse to run it as root."""

    code = ErrorCode.UNAVAILABLE
