"""Guest images the helper can boot: ``<images_dir>/<name>/`` as built by ``make image``.

An image directory holds ``vmlinuz``, ``initrd.img``, ``rootfs.img`` and
``manifest.json``.  The helper imports ``rootfs.img`` as a storage *base*
named after the image and its content hash, so rebuilding an image makes a new
base while volumes created from the old one keep working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.types import NAME_PATTERN

from .errors import RequestFailed

_NAME_RE = re.compile(NAME_PATTERN)
_HEX_RE = re.compile(r"\A[0-9a-f]{64}\Z")
REQUIRED_FILES = ("vmlinuz", "initrd.img", "rootfs.img", "manifest.json")


class _FileEntry(msgspec.Struct):
    sha256: str
    size: int


class Manifest(msgspec.Struct):
    """The parts of ``manifest.json`` the helper uses (other keys are ignored)."""

    name: str
    cmdline: str
    files: dict[str, _FileEntry]
    versions: dict[str, str] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    name: str
    directory: Path
    manifest: Manifest

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def base_name(self) -> str:
        """Storage base for this exact build: ``<name>-<12 hex of the rootfs hash>``."""
        return f"{self.name}-{self.manifest.files['rootfs.img'].sha256[:12]}"

    @property
    def description(self) -> str:
        v = self.manifest.versions
        return f"Debian {v.get('debian_suite', '?')}, kernel {v.get('kernel_release', '?')}"


def load_image(images_dir: Path, name: str) -> Image:
    """The image ``name``; NotFound if it is missing or incomplete."""
    if not _NAME_RE.fullmatch(name):
        raise RequestFailed(ErrorCode.INVALID, f"invalid image name {name!r}")
    d = images_dir / name
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise RequestFailed(
            ErrorCode.NOT_FOUND,
            f"image {name!r} is not installed (build it with 'make image IMAGE={name}')",
        )
    try:
        manifest = msgspec.json.decode((d / "manifest.json").read_bytes(), type=Manifest)
    except (msgspec.DecodeError, OSError) as exc:
        raise RequestFailed(ErrorCode.INTERNAL, f"image {name!r}: bad manifest: {exc}") from None
    entry = manifest.files.get("rootfs.img")
    if entry is None or not _HEX_RE.fullmatch(entry.sha256):
        raise RequestFailed(ErrorCode.INTERNAL, f"image {name!r}: manifest lacks a rootfs hash")
    return Image(name=name, directory=d, manifest=manifest)


def list_images(images_dir: Path) -> list[Image]:
    out: list[Image] = []
    try:
        entries = sorted(images_dir.iterdir())
    except FileNotFoundError:
        return out
    for d in entries:
        if d.is_dir() and _NAME_RE.fullmatch(d.name):
            try:
                out.append(load_image(images_dir, d.name))
            except RequestFailed:
                continue
    return out
