"""Kernel module dependency resolution for the initramfs (images/kmods.py)."""

from __future__ import annotations

import pytest

from images.errors import ModuleResolutionError
from images.kmods import (
    ALWAYS,
    ModuleIndex,
    module_name,
    plan_loads,
    resolve_load_order,
    strip_signature,
    virtio_device_ids,
)

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


ALIAS = """\
alias acpi*:LNRO0005:* virtio_mmio
alias virtio:d00000004v* virtio_rng
alias virtio:d00000003v* virtio_console
alias virtio:d00000002v* virtio_blk
alias virtio:d00000001v* virtio_net
alias virtio:d00000001v* virtio-net
alias virtio:d*v* some_generic_thing
alias virtio:dXYZ00001v* broken
alias acpi*:QEMU0002:* qemu_fw_cfg
alias virtio:d00000013v* vmw_vsock_virtio_transport
"""


def test_virtio_device_ids_from_modules_alias() -> None:
    ids = virtio_device_ids(ALIAS)
    assert ids["virtio_blk"] == {2}
    assert ids["virtio_net"] == {1}
    assert ids["vmw_vsock_virtio_transport"] == {0x13}
    for absent in ("virtio_mmio", "qemu_fw_cfg", "some_generic_thing", "broken"):
        assert absent not in ids


def test_device_drivers_load_only_with_their_devices_and_deps_follow() -> None:
    plan = plan_loads(
        index(),
        ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport", "qemu_fw_cfg"],
        virtio_device_ids(ALIAS),
    )
    cond = {module_name(path): c for c, path in plan}
    # Needed by virtio_mmio, which has no virtio device id: always.
    assert cond["virtio_mmio"] == cond["virtio"] == cond["virtio_ring"] == ALWAYS
    assert cond["qemu_fw_cfg"] == ALWAYS
    assert cond["virtio_blk"] == "0x0002"
    assert cond["virtio_net"] == cond["failover"] == cond["net_failover"] == "0x0001"
    # vsock comes only with the vsock transport's device.
    assert cond["vsock"] == cond["vmw_vsock_virtio_transport"] == "0x0013"
    # Same order as the dependency resolution.
    order = resolve_load_order(
        index(),
        ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport", "qemu_fw_cfg"],
    )
    assert [p for _c, p in plan] == order


def test_a_shared_dependency_takes_the_union_of_conditions() -> None:
    idx = ModuleIndex.parse(
        "kernel/a.ko: kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n", ""
    )
    plan = plan_loads(idx, ["a", "b"], {"a": frozenset({1}), "b": frozenset({0x13, 2})})
    assert plan == [
        ("0x0001,0x0002,0x0013", "kernel/c.ko"),
        ("0x0001", "kernel/a.ko"),
        ("0x0002,0x0013", "kernel/b.ko"),
    ]
    # One wanted module without device ids makes its whole closure unconditional.
    plan = plan_loads(idx, ["a", "b"], {"a": frozenset({1})})
    assert plan == [(ALWAYS, "kernel/c.ko"), ("0x0001", "kernel/a.ko"), (ALWAYS, "kernel/b.ko")]


MAGIC = b"~Module signature appended~\n"


def signed(body: bytes, sig: bytes) -> bytes:
    info = bytes(8) + len(sig).to_bytes(4, "big")
    return body + sig + info + MAGIC


def test_signature_is_stripped_and_unsigned_modules_pass_through() -> None:
    body = b"\x7fELF" + b"module code" * 10
    assert strip_signature(signed(body, b"S" * 512)) == body
    assert strip_signature(body) == body


@pytest.mark.parametrize(
    "blob",
    [
        MAGIC,  # no room for the signature info
        bytes(8) + (10_000).to_bytes(4, "big") + MAGIC,  # signature longer than the file
        b"x" + bytes(8) + (1).to_bytes(4, "big") + MAGIC,  # nothing left of the module
    ],
)
def test_inconsistent_signature_trailer_is_refused(blob: bytes) -> None:
    with pytest.raises(ModuleResolutionError):
        strip_signature(blob)
