"""Durable, atomic replacement of small state files (registry, VM records,
network state, volume metadata).

``atomic_write`` writes a temporary file beside the target, fsyncs it,
renames it over the target and fsyncs the directory: after a crash the file
is either the old or the new one, never torn, and a completed write survives
a power cut.  A full filesystem (ENOSPC, EDQUOT) is the typed
:class:`StateFilesystemFull`, and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from agentiso.protocol.errors import ErrorCode

from .errors import HelperError

#: errno values that mean "the filesystem is full" (EDQUOT: a quota on it).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StateFilesystemFull(HelperError):
    """A write on the helper's state filesystem failed with ENOSPC/EDQUOT.

    Neither the caller's fault nor a helper bug: ``unavailable``.  What the
    request was doing is undone where it can be; the helper keeps serving.
    """

    code = ErrorCode.UNAVAILABLE

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"no space left on the helper's state filesystem while {what}; "
            "the operator must free space there (or delete snapshots), then retry"
        )


def is_full(exc: BaseException) -> bool:
    """True for an OSError that means "no space" (ENOSPC or EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (the directory must exist).

    Raises :class:`StateFilesystemFull` when the filesystem is full; ``path``
    is then unchanged and no temporary file is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            try:
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        if is_full(exc):
            raise StateFilesystemFull(f"saving {path.name}") from None
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
