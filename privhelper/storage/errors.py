"""Typed errors of the volume layer.

Every error derives from :class:`StorageError`, itself a
:class:`~agentiso.privhelper.errors.HelperError`:
the RPC layer answers any of them as a typed ``Error`` frame with the class's
``code`` without knowing about storage.  Messages never contain host paths that
a client did not already know, except :class:`CommandFailed`, whose stderr is
for the operator's log (its ``code`` is ``internal``).
"""

from __future__ import annotations

from collections.abc import Sequence

from agentiso.protocol.errors import ErrorCode

from ..errors import HelperError


class StorageError(HelperError):
    """Root of the volume layer's errors."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidArgument(StorageError):
    """A name or size breaks the rules (the caller's fault)."""

    code = ErrorCode.INVALID


class InvalidName(InvalidArgument):
    def __init__(self, kind: str, value: object, why: str) -> None:
        self.kind = kind
        self.value = value
        # repr() keeps NUL, newlines and escapes visible and harmless in a log line;
        # cut it so a 1 MiB "name" does not become a 1 MiB message.
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {kind} name {shown}: {why}")


class InvalidSize(InvalidArgument):
    def __init__(self, value: object, why: str) -> None:
        self.value = value
        super().__init__(f"invalid size {value!r}: {why}")


class NotFound(StorageError):
    code = ErrorCode.NOT_FOUND

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} does not exist")


class AlreadyExists(StorageError):
    code = ErrorCode.ALREADY_EXISTS

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} already exists")


class HasDependents(StorageError):
    """The object cannot go away (or be rewound past) while others are built on it."""

    code = ErrorCode.CONFLICT

    def __init__(self, kind: str, name: str, dependents: Sequence[str]) -> None:
        self.kind = kind
        self.name = name
        self.dependents = tuple(sorted(dependents))
        super().__init__(
            f"{kind} {name!r} has dependents: {', '.join(self.dependents)}; destroy them first"
        )


class VolumeBusy(StorageError):
    """The volume is in use (a QEMU holds its image lock) and the operation needs it idle."""

    code = ErrorCode.CONFLICT

    def __init__(self, name: str, operation: str) -> None:
        self.name = name
        super().__init__(f"volume {name!r} is in use; {operation} needs it stopped")


class VolumeMerging(StorageError):
    """A snapshot of the volume is being merged (its deletion): every other
    operation on that volume is refused until the merge ends."""

    code = ErrorCode.CONFLICT

    def __init__(self, name: str, operation: str) -> None:
        self.name = name
        super().__init__(
            f"cannot {operation} this volume now: a snapshot of it is being deleted "
            "(its data merged); retry when that ends"
        )


class BackendUnavailable(StorageError):
    """The backend's tools or pool are missing or not answering (the host's fault)."""

    code = ErrorCode.UNAVAILABLE


class CommandFailed(StorageError):
    """An external command (qemu-img, zfs, zpool) exited non-zero."""

    code = ErrorCode.INTERNAL

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:]
        super().__init__(
            f"{argv[0]} {argv[1] if len(argv) > 1 else ''} exited {returncode}: " + " / ".join(tail)
        )


class CorruptState(StorageError):
    """On-disk metadata is unreadable or inconsistent with the files."""

    code = ErrorCode.INTERNAL
