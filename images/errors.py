"""The image build's single exception root."""

from __future__ import annotations


class ImageBuildError(Exception):
    """Anything that stops an image build: bad input, a failing tool, a missing file."""


class AptSourceError(ImageBuildError):
    """No usable Debian mirror could be derived from the apt configuration."""


class ModuleResolutionError(ImageBuildError):
    """A kernel module (or one of its dependencies) is neither a module nor built in."""


class CpioError(ImageBuildError):
    """An entry cannot be represented in a newc cpio archive."""


class PackageMetadataError(ImageBuildError):
    """Debian package metadata does not say what the build needs (e.g. no kernel dependency)."""


class ToolError(ImageBuildError):
    """An external tool (apt-get, debootstrap, mkfs.ext4, ...) failed."""
