"""What a compromised QEMU can do to a qcow2 layer it holds read-write:
rewrite the header so it names another backing file and an external data
file (any host paths).  Tests use it to play that QEMU.

The rewrite keeps the image's tables (L1, refcounts) where they are and
rebuilds only the header extensions and the backing file name, which live
in the first cluster; the result is an image QEMU itself opens (and follows).
"""

from __future__ import annotations

import struct
from pathlib import Path

from agentiso.privhelper.storage import qcow2_header as qh


def rewrite_header(
    path: Path, *, backing: str | None, backing_format: str | None = None,
    data_file: str | None = None,
) -> None:
    buf = bytearray(path.read_bytes()[: qh.HEADER_READ])
    hdr = qh.parse_header(bytes(buf))
    if hdr.version != 3:
        raise ValueError("only version 3 headers are rewritten")
    header_len = struct.unpack_from(">I", buf, 100)[0]
    exts: list[tuple[int, bytes]] = []
    off = header_len
    while True:
        etype, elen = struct.unpack_from(">II", buf, off)
        if etype == qh.EXT_END:
            break
        if etype not in (qh.EXT_BACKING_FORMAT, qh.EXT_DATA_FILE):
            exts.append((etype, bytes(buf[off + 8 : off + 8 + elen])))
        off += 8 + ((elen + 7) & ~7)
    if backing_format is not None:
        exts.append((qh.EXT_BACKING_FORMAT, backing_format.encode()))
    incompat = hdr.incompatible & ~qh.INCOMPAT_DATA_FILE
    if data_file is not None:
        exts.append((qh.EXT_DATA_FILE, data_file.encode()))
        incompat |= qh.INCOMPAT_DATA_FILE
    out = bytearray()
    for etype, data in exts:
        out += struct.pack(">II", etype, len(data)) + data + b"\0" * (-len(data) % 8)
    out += struct.pack(">II", qh.EXT_END, 0)
    name = backing.encode() if backing is not None else b""
    name_off = header_len + len(out) if backing is not None else 0
    end = header_len + len(out) + len(name)
    if end > qh.HEADER_READ:
        raise ValueError("the new header does not fit in the first cluster")
    buf[header_len:end] = out + name
    struct.pack_into(">QI", buf, 8, name_off, len(name))
    struct.pack_into(">Q", buf, 72, incompat)
    with path.open("r+b") as f:
        f.write(bytes(buf[:end]))
