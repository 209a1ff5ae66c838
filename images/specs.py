"""What each image is made of (the contract shared with the guest and VM engines)."""

from __future__ import annotations

import dataclasses

#: Bump when a build step changes what it produces, to invalidate every cache.
BUILDER_VERSION = 1

SUITE = "bookworm"
ARCH = "amd64"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

#: The kernel command line every image boots with (recorded in manifest.json, where
#: the build host's ``tsc_early_khz=`` is appended: see images/hosttsc.py).
#: panic=-1 reboots at once on a panic and reboot=t resets by triple fault (microvm
#: has no reset register the kernel trusts), so QEMU with -no-reboot exits instead
#: of hanging; tsc=reliable keeps the (host) TSC as clocksource under TCG;
#: cryptomgr.notests skips the crypto self-tests (~0.25 s of emulated CPU, 14% of
#: the boot to init); quiet keeps the slow emulated UART out of the boot path.
CMDLINE = "console=ttyS0 panic=-1 reboot=t tsc=reliable cryptomgr.notests quiet"

#: Modules the initramfs loads, by name; dependencies (vsock for the vsock
#: transport, virtio, virtio_ring, failover) are resolved from modules.dep and
#: built-in ones (ext4 in the cloud kernel) skipped.  Drivers of virtio devices are
#: loaded only when the VM has such a device (see kmods.plan_loads).
INITRAMFS_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "qemu_fw_cfg",
    # Entropy from the host (-device virtio-rng-device): without it the first
    # getrandom() in the guest blocks for about a second under TCG.
    "virtio_rng",
    "ext4",
)

_BASE_PACKAGES = ("python3", "iproute2", "e2fsprogs", "util-linux", "procps", "kmod")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image: its name and the Debian packages debootstrap installs."""

    name: str
    packages: tuple[str, ...]
    hostname: str = "agentiso"


IMAGES: dict[str, ImageSpec] = {
    "minimal": ImageSpec("minimal", _BASE_PACKAGES),
    "dev": ImageSpec("dev", (*_BASE_PACKAGES, "git", "curl", "build-essential", "ca-certificates")),
}
