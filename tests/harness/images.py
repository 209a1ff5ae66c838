"""Finding a built image, deciding whether a test can use it, pinning it.

One way to skip when an image is missing: :func:`require_image` (or, for a whole
module, :func:`skip_unless_image`), both from :func:`unusable_reason`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_FILES = ("vmlinuz", "initrd.img", "rootfs.img", "manifest.json")
#: What booting an image takes on the host.
BOOT_TOOLS = ("qemu-system-x86_64", "qemu-img")

_INSTALL = {
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-img": "apt-get install qemu-utils",
    "debugfs": "apt-get install e2fsprogs",
}


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


def unusable_reason(directory: Path, tools: Sequence[str] = BOOT_TOOLS) -> str | None:
    """Why the image in ``directory`` cannot be used here (a tool missing, the
    image not built), or None if it can."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({_INSTALL.get(tool, 'install it')})"
    absent = [f for f in _FILES if not (directory / f).is_file()]
    if absent:
        return (f"image not built ({', '.join(absent)} missing in {directory}): "
                f"run `make image IMAGE={directory.name}`")
    return None


def missing_reason(directory: Path) -> str | None:
    """Why an image in ``directory`` cannot be booted here (QEMU included)."""
    return unusable_reason(directory, BOOT_TOOLS[:1])


def require_image(name: str = "minimal", *, tools: Sequence[str] = BOOT_TOOLS) -> ImageInfo:
    """The built image ``name``, or ``pytest.skip`` with the reason it cannot be used
    here.  ``tools``: what the test needs on the host besides the image (booting by
    default; ``()`` for a test that only reads the image's files)."""
    directory = image_dir(name)
    reason = unusable_reason(directory, tools)
    if reason is not None:
        pytest.skip(reason=reason)
    try:
        return ImageInfo.load(directory)
    except (OSError, ValueError, KeyError) as exc:
        pytest.skip(reason=f"image {directory} has an unreadable manifest ({exc}): `make image`")


def skip_unless_image(name: str = "minimal", *, tools: Sequence[str] = BOOT_TOOLS
                      ) -> pytest.MarkDecorator:
    """``pytestmark = skip_unless_image()``: the same rule as :func:`require_image`
    for a whole module, decided at collection."""
    reason = unusable_reason(image_dir(name), tools)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def pin_image(source: Path, dest: Path, timeout: float = 300.0) -> ImageInfo:
    """Hard-link the image in ``source`` into ``dest``: a rebuild (which writes new
    files and renames them over the old) cannot change it under a running test.
    Waits out a rebuild in progress; retried until the linked files are the ones
    the linked manifest describes.  Skips the test if it keeps changing."""
    files = ("vmlinuz", "initrd.img", "rootfs.img")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            manifest = json.loads((source / "manifest.json").read_text())
            dest.mkdir(mode=0o755, exist_ok=True)
            for f in (*files, "manifest.json"):
                (dest / f).unlink(missing_ok=True)
                os.link(source / f, dest / f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(1)  # a rebuild is under way
            continue
        pinned = json.loads((dest / "manifest.json").read_text())
        sizes = pinned.get("files", {})
        if pinned == manifest and all(
            (dest / f).stat().st_size == sizes.get(f, {}).get("size") for f in files
        ):
            return ImageInfo.load(dest)
        time.sleep(1)
    pytest.skip(reason=f"the image in {source} kept changing (a rebuild) for {timeout:.0f} s")
