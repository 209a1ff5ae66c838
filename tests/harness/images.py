"""Finding a built image and deciding whether a test can boot it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_FILES = ("vmlinuz", "initrd.img", "rootfs.img", "manifest.json")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """A built image: its directory and the kernel command line from its manifest."""

    dir: Path
    cmdline: str
    manifest: dict[str, object]

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @classmethod
    def load(cls, directory: Path) -> ImageInfo:
        """Read ``directory/manifest.json``; raises OSError/ValueError when unusable."""
        manifest = json.loads((directory / "manifest.json").read_text())
        cmdline = manifest["cmdline"]
        if not isinstance(cmdline, str):
            raise ValueError("manifest cmdline is not a string")
        return cls(directory, cmdline, manifest)


def image_dir(name: str = "minimal") -> Path:
    """Where ``make image IMAGE=name`` puts the image of this checkout."""
    return REPO / "build" / "images" / name


def missing_reason(directory: Path) -> str | None:
    """Why an image in ``directory`` cannot be booted here, or None if it can."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    absent = [f for f in _FILES if not (directory / f).is_file()]
    if absent:
        return f"image not built ({', '.join(absent)} missing in {directory}): run `make image`"
    return None


def require_image(name: str = "minimal") -> ImageInfo:
    """The built image ``name``, or ``pytest.skip`` with the reason it cannot boot here."""
    directory = image_dir(name)
    reason = missing_reason(directory)
    if reason is None and shutil.which("qemu-img") is None:
        reason = "qemu-img is not installed (apt-get install qemu-utils)"
    if reason is not None:
        pytest.skip(reason=reason)
    try:
        return ImageInfo.load(directory)
    except (OSError, ValueError, KeyError) as exc:
        pytest.skip(reason=f"image {directory} has an unreadable manifest ({exc}): `make image`")
