"""Parsing of ``qemu-img`` output (pure)."""

from __future__ import annotations

import msgspec

from .errors import CorruptState


class ImageInfo(msgspec.Struct, rename="kebab"):
    """The fields of ``qemu-img info --output=json`` the backends use."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int = 0
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None


_decoder = msgspec.json.Decoder(ImageInfo)


def parse_info(text: str) -> ImageInfo:
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise CorruptState(f"unexpected qemu-img info output: {exc}") from None


def is_lock_error(stderr: str) -> bool:
    """True when qemu-img failed because a running QEMU holds the image's lock."""
    return 'Failed to get "write" lock' in stderr or "Failed to get shared" in stderr
