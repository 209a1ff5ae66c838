"""A deterministic writer for ``newc`` cpio archives (the initramfs format).

Writing the archive ourselves (rather than running ``cpio``) lets the build put
device nodes (``/dev/console``) in it without root or ``mknod``, and gives
byte-identical output for identical input: every mtime is fixed and inode numbers
are assigned in order.  Pure: the caller supplies file contents as bytes.
"""

from __future__ import annotations

import dataclasses
import stat

from .errors import CpioError

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archive member; ``path`` is relative (no leading '/')."""

    path: str
    mode: int  # full st_mode, type bits included
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, name: bytes, mtime: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        mtime,
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check
    )
    return _MAGIC + b"".join(f"{v:08x}".encode() for v in fields)


def _validate(entry: Entry) -> None:
    p = entry.path
    parts = p.split("/")
    if not p or "\0" in p or any(part in ("", ".", "..") for part in parts):
        raise CpioError(f"bad archive path {p!r}")
    if stat.S_IFMT(entry.mode) not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR):
        raise CpioError(f"unsupported file type for {p!r}")
    if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
        raise CpioError(f"{p!r}: only regular files and symlinks carry data")
    if len(entry.data) > 0xFFFFFFFF:
        raise CpioError(f"{p!r}: larger than 4 GiB")


def archive(entries: list[Entry], mtime: int = 0) -> bytes:
    """Serialise ``entries`` (parents before children) into one newc archive.

    Raises :class:`CpioError` for an unrepresentable or unsafe entry, a duplicate
    path, or a member whose parent directory was not listed before it.
    """
    out = bytearray()
    seen: set[str] = set()
    dirs: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        _validate(entry)
        if entry.path in seen:
            raise CpioError(f"duplicate archive path {entry.path!r}")
        parent = entry.path.rpartition("/")[0]
        if parent and parent not in dirs:
            raise CpioError(f"{entry.path!r} comes before its directory {parent!r}")
        seen.add(entry.path)
        if stat.S_ISDIR(entry.mode):
            dirs.add(entry.path)
        name = entry.path.encode() + b"\0"
        head = _header(ino, entry, name, mtime)
        out += head + name + _pad4(len(head) + len(name))
        out += entry.data + _pad4(len(entry.data))
    name = _TRAILER.encode() + b"\0"
    head = _header(0, Entry(_TRAILER, 0), name, 0)
    out += head + name + _pad4(len(head) + len(name))
    return bytes(out)
