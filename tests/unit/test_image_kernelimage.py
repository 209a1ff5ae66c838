"""Taking a bzImage apart and checking for the PVH entry (images/kernelimage.py)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct

import pytest

from images import kernelimage as ki
from images.errors import ImageBuildError
from images.steps import decompress, pvh_kernel


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    return struct.pack("<III", len(name0), len(desc), ntype) + pad4(name0) + pad4(desc)


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def elf(notes: bytes, machine: int = 62) -> bytes:
    """A minimal ELF64 with one PT_NOTE program header holding ``notes``."""
    phoff, phentsize = 64, 56
    data_off = phoff + phentsize
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0, phoff, 0, 0, 64, phentsize, 1, 0, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 4, 4, data_off, 0, 0, len(notes), len(notes), 4)
    return header + phdr + notes


PVH_ELF = elf(note(b"GNU", 3, b"id") + note(b"Xen", 18, b"\0\0\0\x01"))
PLAIN_ELF = elf(note(b"Xen", 6, b"linux\0") + note(b"GNU", 3, b"id"))


def bzimage(payload: bytes, setup_sects: int = 4, protocol: int = 0x20F) -> bytes:
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    offset = 100
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\0" * offset + payload + b"trailing"


def with_size(compressed: bytes, size: int) -> bytes:
    return compressed + struct.pack("<I", size)


def test_pvh_note_is_found_and_its_absence_too() -> None:
    assert ki.has_pvh_entry(PVH_ELF)
    assert not ki.has_pvh_entry(PLAIN_ELF)
    assert not ki.has_pvh_entry(elf(note(b"Xen", 18, b"x"), machine=3))  # i386
    assert not ki.has_pvh_entry(b"MZ not an elf" * 10)
    assert not ki.has_pvh_entry(PVH_ELF[:80])  # truncated program header table


def test_payload_is_located_by_the_boot_header() -> None:
    payload = with_size(gzip.compress(PVH_ELF), len(PVH_ELF))
    image = bzimage(payload, setup_sects=7)
    start, length = ki.bzimage_payload(image)
    assert image[start : start + length] == payload
    # setup_sects 0 means 4, per the boot protocol.
    start0, _ = ki.bzimage_payload(bzimage(payload, setup_sects=0))
    assert start0 == 5 * 512 + 100


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\0" * 4096, "HdrS"),
        (bzimage(b"x" * 16, protocol=0x206), "protocol"),
        (bzimage(b"x" * 16)[:2600], "outside"),
        (b"short", "HdrS"),
    ],
)
def test_bad_bzimages_are_refused(blob: bytes, match: str) -> None:
    with pytest.raises(ki.KernelImageError, match=match):
        ki.bzimage_payload(blob)
    assert issubclass(ki.KernelImageError, ImageBuildError)


def test_compression_by_magic() -> None:
    assert ki.compression_of(gzip.compress(b"x")) == "gzip"
    assert ki.compression_of(lzma.compress(b"x")) == "xz"
    assert ki.compression_of(b"\x02\x21\x4c\x18rest") == "lz4"
    assert ki.compression_of(b"\x28\xb5\x2f\xfdrest") == "zstd"
    with pytest.raises(ki.KernelImageError, match="unknown"):
        ki.compression_of(b"\x00\x01\x02\x03\x04\x05")


def test_pvh_kernel_roundtrip_gzip_and_xz() -> None:
    for comp in (gzip.compress, lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)):
        image = bzimage(with_size(comp(PVH_ELF), len(PVH_ELF)))
        assert pvh_kernel(image) == PVH_ELF
    plain = bzimage(with_size(gzip.compress(PLAIN_ELF), len(PLAIN_ELF)))
    assert pvh_kernel(plain) is None


def test_size_mismatch_is_refused() -> None:
    image = bzimage(with_size(gzip.compress(PVH_ELF), len(PVH_ELF) + 1))
    with pytest.raises(ki.KernelImageError, match="header says"):
        pvh_kernel(image)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_payload_through_the_tool() -> None:
    compressed = subprocess_zstd(PVH_ELF)
    assert decompress(compressed, "zstd") == PVH_ELF


def subprocess_zstd(data: bytes) -> bytes:
    import subprocess

    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
