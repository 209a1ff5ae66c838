"""Size-capped log files: ``<path>`` plus one rotated ``<path>.1``.

Two users:

* :class:`BoundedLog` — the helper writes (the serial console, read from
  QEMU's console socket); it rotates when the live file reaches half the cap,
  so the pair never exceeds ``max_bytes``.
* :func:`cap_appended_file` — for a file someone else appends to with
  ``O_APPEND`` (QEMU's stderr): when it exceeds the cap, its tail is moved to
  ``.1`` and it is truncated; QEMU's next write lands at the new end.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..atomicfile import is_full


def _rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class BoundedLog:
    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < 2:
            raise ValueError("max_bytes must be at least 2")
        self.path = path
        self.half = max_bytes // 2
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        #: Bytes not written because the filesystem was full.
        self.dropped = 0

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating at half the cap.  A full filesystem drops
        the rest of ``data`` (counted in :attr:`dropped`); never raises for it."""
        try:
            while data:
                if self._size >= self.half:
                    self._rotate()
                room = self.half - self._size
                chunk = data[:room]
                n = os.write(self._fd, chunk)
                self._size += n
                data = data[n:]
        except OSError as exc:
            if not is_full(exc):
                raise
            self.dropped += len(data)

    def _rotate(self) -> None:
        # A rotation that a full filesystem cut short (the new file could not
        # be made) is simply tried again at the next write.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, _rotated(self.path))
        fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        os.close(self._fd)
        self._fd = fd
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tail(path: Path, nbytes: int) -> bytes:
    """The last ``nbytes`` of ``<path>.1`` followed by ``<path>`` (missing files are empty)."""
    out = b""
    for p in (path, _rotated(path)):
        need = nbytes - len(out)
        if need <= 0:
            break
        try:
            with p.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - need))
                out = f.read(need) + out
        except FileNotFoundError:
            continue
    return out


def cap_appended_file(path: Path, max_bytes: int) -> bool:
    """Keep an ``O_APPEND`` file written by another process under ``max_bytes``.

    Returns True when it rotated.  Bytes appended between the copy and the
    truncation are lost; that window is microseconds and the file is a log.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes // 2:
        return False
    keep = tail(path, max_bytes // 2)  # reads only the live file: it is bigger than keep
    tmp = path.with_name(path.name + ".1.tmp")
    try:
        tmp.write_bytes(keep)
        os.replace(tmp, _rotated(path))
    except OSError as exc:
        if not is_full(exc):
            raise
        # No room for the tail: losing it beats letting the log fill the disk.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    os.truncate(path, 0)
    return True
