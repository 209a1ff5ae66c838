"""The qcow2 header of a layer a guest's QEMU may have rewritten, checked
before root lets ``qemu-img`` open it.

Every layer of a volume was once the top a VM wrote, through a QEMU that
held it read-write.  A compromised QEMU can rewrite the layer's header: its
backing file name, or an *external data file* (incompatible feature bit 2 and
header extension ``DATA``), each naming any host path.  Root's ``qemu-img``
would then read (backing) or read and write (data file) that path.

This module parses only the fixed fields and the extension list of the
header, from at most :data:`HEADER_READ` bytes, with bounds checked on every
field (pure: :func:`parse_header`), and :func:`check_layer` says whether the
header is exactly what the helper wrote: the recorded backing file (format
qcow2), no data file, no encryption, no unknown incompatible features.
Anything else is :class:`UntrustedImage` (``conflict``), before any command
runs.  The commands themselves are pinned too (see ``commands.py``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from agentiso.protocol.errors import ErrorCode

from .errors import StorageError

MAGIC = b"QFI\xfb"
#: The helper's layers use 64 KiB clusters: the header, its extensions and
#: the backing file name all lie in the first cluster.
HEADER_READ = 65536

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
#: Incompatible features a layer the helper made may carry.
_ALLOWED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
AUTOCLEAR_DATA_FILE_RAW = 1 << 1


class UntrustedImage(StorageError):
    """A layer's header is not what the helper wrote: it names another backing
    file, an external data file, or features the helper never uses.  Most
    likely its VM's QEMU rewrote it; nothing was run on it."""

    code = ErrorCode.CONFLICT


@dataclass(frozen=True)
class Header:
    version: int
    backing_file: str | None
    backing_format: str | None
    incompatible: int
    autoclear: int
    crypt_method: int
    data_file: str | None
    #: Extension types present (the data-file one even with an empty name).
    extensions: tuple[int, ...]


def _u32(buf: bytes, off: int) -> int:
    return int(struct.unpack_from(">I", buf, off)[0])


def _u64(buf: bytes, off: int) -> int:
    return int(struct.unpack_from(">Q", buf, off)[0])


def parse_header(buf: bytes) -> Header:
    """Parse the start of a qcow2 file (pure).  ``ValueError`` when it is not a
    well-formed qcow2 header that fits in ``buf``."""
    if len(buf) < 72 or buf[:4] != MAGIC:
        raise ValueError("not a qcow2 image")
    version = _u32(buf, 4)
    if version not in (2, 3):
        raise ValueError(f"qcow2 version {version}")
    backing_off, backing_len = _u64(buf, 8), _u32(buf, 16)
    crypt = _u32(buf, 32)
    incompat = autoclear = 0
    header_len = 72
    if version == 3:
        if len(buf) < 104:
            raise ValueError("truncated version 3 header")
        incompat, autoclear = _u64(buf, 72), _u64(buf, 88)
        header_len = _u32(buf, 100)
        if header_len < 104 or header_len > len(buf):
            raise ValueError(f"header length {header_len}")
    exts: list[int] = []
    backing_format = data_file = None
    off = header_len
    while True:
        if off + 8 > len(buf):
            raise ValueError("header extensions run past the header cluster")
        etype, elen = _u32(buf, off), _u32(buf, off + 4)
        if etype == EXT_END:
            break
        data_off = off + 8
        if data_off + elen > len(buf):
            raise ValueError("header extension runs past the header cluster")
        data = buf[data_off : data_off + elen]
        exts.append(etype)
        if etype == EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "replace")
        elif etype == EXT_DATA_FILE:
            data_file = data.decode("utf-8", "replace")
        off = data_off + ((elen + 7) & ~7)
        if len(exts) > 64:
            raise ValueError("too many header extensions")
    backing = None
    if backing_off:
        if backing_len == 0 or backing_len > 1023 or backing_off + backing_len > len(buf):
            raise ValueError("backing file name out of bounds")
        backing = buf[backing_off : backing_off + backing_len].decode("utf-8", "replace")
    return Header(version, backing, backing_format, incompat, autoclear, crypt, data_file,
                  tuple(exts))


def check_layer(header: Header, expected_backing: Path | None, what: str) -> None:
    """Raise :class:`UntrustedImage` unless ``header`` is a plain qcow2 layer over
    exactly ``expected_backing`` (format qcow2), or over nothing when None."""
    problems = []
    want = None if expected_backing is None else str(expected_backing)
    if header.backing_file != want:
        problems.append(f"backing file {header.backing_file!r} (expected {want!r})")
    if want is not None and header.backing_format not in (None, "qcow2"):
        problems.append(f"backing format {header.backing_format!r}")
    if header.incompatible & INCOMPAT_DATA_FILE or EXT_DATA_FILE in header.extensions:
        problems.append(f"an external data file {header.data_file!r}")
    if header.autoclear & AUTOCLEAR_DATA_FILE_RAW:
        problems.append("a raw external data file")
    if header.incompatible & ~_ALLOWED_INCOMPAT & ~INCOMPAT_DATA_FILE:
        problems.append(f"incompatible features {header.incompatible:#x}")
    if header.crypt_method or EXT_ENCRYPTION in header.extensions:
        problems.append("encryption")
    if problems:
        raise UntrustedImage(
            f"{what}: its qcow2 header is not what the helper wrote ({'; '.join(problems)}); "
            "its VM probably rewrote it, so the helper will not open it: destroy the volume "
            "(or roll it back to an earlier snapshot)"
        )


def read_header(path: Path) -> Header:
    """Read and parse ``path``'s header without following a symlink (I/O edge).

    Only the first :data:`HEADER_READ` bytes are read; an unparsable header is
    :class:`UntrustedImage` too."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        buf = os.pread(fd, HEADER_READ, 0)
    finally:
        os.close(fd)
    try:
        return parse_header(buf)
    except (ValueError, struct.error) as exc:
        raise UntrustedImage(f"a layer's qcow2 header is unreadable: {exc}") from None
