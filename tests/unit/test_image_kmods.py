"""Kernel module dependency resolution for the initramfs (images/kmods.py)."""

from __future__ import annotations

import pytest

from images.errors import ModuleResolutionError
from images.kmods import ModuleIndex, module_name, resolve_load_order

# Shaped like the real modules.dep of Debian's 6.1 cloud kernel.
DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: \
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/firmware/qemu_fw_cfg.ko:
kernel/fs/xfs/xfs.ko.xz: kernel/lib/libcrc32c.ko.zst
kernel/lib/libcrc32c.ko.zst:
"""
BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n\n"


def index() -> ModuleIndex:
    return ModuleIndex.parse(DEP, BUILTIN)


def test_module_name_strips_dirs_suffixes_and_normalises_dashes() -> None:
    assert module_name("kernel/drivers/virtio/virtio_mmio.ko") == "virtio_mmio"
    assert module_name("kernel/fs/xfs/xfs.ko.xz") == "xfs"
    assert module_name("kernel/lib/libcrc32c.ko.zst") == "libcrc32c"
    assert module_name("kernel/x/snd-hda.ko") == "snd_hda"


def test_dependencies_come_first_and_each_file_once() -> None:
    order = resolve_load_order(
        index(), ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"]
    )
    assert len(order) == len(set(order))
    names = [module_name(p) for p in order]
    deps = {module_name(p): [module_name(d) for d in ds] for p, ds in index().deps.values()}
    for i, name in enumerate(names):
        for dep in deps[name]:
            assert names.index(dep) < i, f"{dep} must load before {name}"
    assert names[:2] == ["virtio_ring", "virtio"]


def test_builtin_modules_are_skipped() -> None:
    assert resolve_load_order(index(), ["ext4", "jbd2"]) == []
    assert resolve_load_order(index(), ["ext4", "qemu_fw_cfg"]) == [
        "kernel/drivers/firmware/qemu_fw_cfg.ko"
    ]


def test_dash_spelling_of_a_name_is_accepted() -> None:
    assert resolve_load_order(index(), ["qemu-fw-cfg"]) == [
        "kernel/drivers/firmware/qemu_fw_cfg.ko"
    ]


def test_compressed_module_paths_are_kept() -> None:
    assert resolve_load_order(index(), ["xfs"]) == [
        "kernel/lib/libcrc32c.ko.zst",
        "kernel/fs/xfs/xfs.ko.xz",
    ]


def test_unknown_module_is_a_typed_error() -> None:
    with pytest.raises(ModuleResolutionError, match="nosuchmod"):
        resolve_load_order(index(), ["nosuchmod"])


def test_missing_dependency_names_who_needed_it() -> None:
    broken = ModuleIndex.parse("kernel/a.ko: kernel/gone.ko\n", "")
    with pytest.raises(ModuleResolutionError, match="needed by 'a'"):
        resolve_load_order(broken, ["a"])


def test_dependency_cycle_is_detected() -> None:
    cyclic = ModuleIndex.parse("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "")
    with pytest.raises(ModuleResolutionError, match="cycle"):
        resolve_load_order(cyclic, ["a"])
