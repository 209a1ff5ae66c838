"""The newc cpio writer behind the initramfs (images/cpio.py)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from images import cpio
from images.errors import CpioError


def sample() -> list[cpio.Entry]:
    return [
        cpio.directory("bin"),
        cpio.regular("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.symlink("bin/sh", "tool"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("init", b"x" * 5, 0o700),
    ]


def parse(blob: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """A tiny independent newc reader: (name, mode, data, rdev major, rdev minor)."""
    out: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        head = blob[pos : pos + 110]
        assert head[:6] == b"070701"
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        pos += 110
        name = blob[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = blob[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return out
        out.append((name, fields[1], data, fields[9], fields[10]))


def test_roundtrip_through_an_independent_reader() -> None:
    got = parse(cpio.archive(sample()))
    assert [g[0] for g in got] == ["bin", "bin/tool", "bin/sh", "dev", "dev/console", "init"]
    by_name = {g[0]: g for g in got}
    assert by_name["bin/tool"][2] == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by_name["bin/tool"][1]) == 0o755
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"tool"
    assert stat.S_ISCHR(by_name["dev/console"][1])
    assert by_name["dev/console"][3:] == (5, 1)


def test_output_is_deterministic() -> None:
    assert cpio.archive(sample()) == cpio.archive(sample())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    blob = cpio.archive(sample())
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=blob, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/tool", "bin/sh", "dev", "dev/console", "init"]
    entries = [e for e in sample() if not stat.S_ISCHR(e.mode)]  # mknod may be refused
    subprocess.run(
        ["cpio", "-i", "--quiet", "-d"], input=cpio.archive(entries), cwd=tmp_path, check=True
    )
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/sh").readlink() == Path("tool")


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "..", "a//b", "./a", "a/", "nul\0byte"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(CpioError):
        cpio.archive([cpio.regular(path, b"")])


def test_duplicates_and_orphans_are_refused() -> None:
    with pytest.raises(CpioError, match="duplicate"):
        cpio.archive([cpio.regular("a", b""), cpio.regular("a", b"")])
    with pytest.raises(CpioError, match="before its directory"):
        cpio.archive([cpio.regular("d/a", b""), cpio.directory("d")])


def test_unsupported_types_and_data_on_devices_are_refused() -> None:
    with pytest.raises(CpioError, match="type"):
        cpio.archive([cpio.Entry("fifo", stat.S_IFIFO | 0o644)])
    with pytest.raises(CpioError, match="carry data"):
        cpio.archive([cpio.Entry("dev", stat.S_IFCHR | 0o600, b"x", 1, 3)])
