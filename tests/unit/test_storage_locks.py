"""image_in_use against real byte-range locks held by another process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agentiso.privhelper.storage.locks import image_in_use

# What QEMU does: an OFD lock on one of the bytes 100..299 of the image.
HOLDER = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
F_OFD_SETLK = 37
fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[2]), 1, 0))
print("locked", flush=True)
sys.stdin.read()
"""


def _held(path: Path, offset: int) -> bool:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(offset)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        try:
            return image_in_use(path)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)


def test_unlocked_and_missing(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 4096)
    assert not image_in_use(img)
    assert not image_in_use(tmp_path / "missing.img")


def test_qemu_style_locks_detected(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 4096)
    assert _held(img, 100)  # a held permission
    assert _held(img, 201)  # an unshared permission
    assert not _held(img, 400)  # outside QEMU's range
    assert not image_in_use(img)
