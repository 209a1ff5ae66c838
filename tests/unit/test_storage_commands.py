"""The argv builders: exact argv, no shell, absolute backing paths, -F always."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper.storage import commands as cmd


def test_overlay_is_unsafe_sized_with_backing_format() -> None:
    argv = cmd.qemu_img_create_overlay(
        Path("/s/layers/b.qcow2"), Path("/s/layers/a.qcow2"), "qcow2", 1 << 30
    )
    assert argv[:3] == ["qemu-img", "create", "-q"]
    i = argv.index("-b")
    assert argv[i + 1] == "/s/layers/a.qcow2"
    assert argv[argv.index("-F") + 1] == "qcow2"
    assert "-u" in argv  # does not open the backing: O(1), works under a running QEMU
    assert argv[-2:] == ["/s/layers/b.qcow2", str(1 << 30)]


@pytest.mark.parametrize("builder", [cmd.qemu_img_create_overlay, cmd.qemu_img_rebase])
def test_relative_backing_refused(builder: object) -> None:
    with pytest.raises(ValueError, match="absolute"):
        if builder is cmd.qemu_img_create_overlay:
            cmd.qemu_img_create_overlay(Path("/x.qcow2"), Path("rel.qcow2"), "qcow2", 1024)
        else:
            cmd.qemu_img_rebase(Path("/x.qcow2"), Path("../rel.qcow2"), "qcow2")


def test_rebase_is_safe_mode_with_format() -> None:
    argv = cmd.qemu_img_rebase(Path("/l/c.qcow2"), Path("/l/p.qcow2"), "qcow2")
    assert argv == [
        "qemu-img",
        "rebase",
        "-f",
        "qcow2",
        "-b",
        "/l/p.qcow2",
        "-F",
        "qcow2",
        "/l/c.qcow2",
    ]
    assert "-u" not in argv


def test_info_variants() -> None:
    assert cmd.qemu_img_info(Path("/a")) == ["qemu-img", "info", "--output=json", "-U", "/a"]
    assert "-U" not in cmd.qemu_img_info(Path("/a"), force_share=False)
    assert "--backing-chain" in cmd.qemu_img_info(Path("/a"), backing_chain=True)


def test_convert_and_resize() -> None:
    assert cmd.qemu_img_convert(Path("/i"), "raw", Path("/o"), "raw") == [
        "qemu-img", "convert", "-f", "raw", "-O", "raw", "/i", "/o",
    ]  # fmt: skip
    assert "cluster_size=65536" in cmd.qemu_img_convert(Path("/i"), "raw", Path("/o"), "qcow2")
    to_dev = cmd.qemu_img_convert_to_device(Path("/i"), "qcow2", Path("/dev/zvol/p/x"))
    assert to_dev[2:4] == ["-n", "--target-is-zero"] and to_dev[-1] == "/dev/zvol/p/x"
    assert cmd.qemu_img_resize(Path("/t"), "qcow2", 2048) == [
        "qemu-img", "resize", "-q", "-f", "qcow2", "/t", "2048",
    ]  # fmt: skip


def test_zfs_builders() -> None:
    assert cmd.zfs_create("p/a", {"compression": "lz4"}, parents=True) == [
        "zfs", "create", "-p", "-o", "compression=lz4", "p/a",
    ]  # fmt: skip
    assert cmd.zfs_create_zvol("p/v", 1 << 20, {"volblocksize": "16384"}) == [
        "zfs", "create", "-s", "-V", str(1 << 20), "-o", "volblocksize=16384", "p/v",
    ]  # fmt: skip
    assert cmd.zfs_snapshot("p/v", "s1") == ["zfs", "snapshot", "p/v@s1"]
    assert cmd.zfs_clone("p/i/b@base", "p/v/x") == ["zfs", "clone", "p/i/b@base", "p/v/x"]
    assert cmd.zfs_rollback("p/v", "s1", destroy_later=True) == ["zfs", "rollback", "-r", "p/v@s1"]
    assert cmd.zfs_rollback("p/v", "s1", destroy_later=False) == ["zfs", "rollback", "p/v@s1"]
    assert cmd.zfs_destroy("p/v", recursive=True) == ["zfs", "destroy", "-r", "p/v"]
    assert "-R" not in cmd.zfs_destroy("p/v", recursive=True)  # never destroys clones
    assert cmd.zfs_promote("p/v/c") == ["zfs", "promote", "p/v/c"]
    assert cmd.zfs_rename("p/v@a", "p/v@b") == ["zfs", "rename", "p/v@a", "p/v@b"]
    assert cmd.zfs_set("p/v", "volsize", "10") == ["zfs", "set", "volsize=10", "p/v"]
    assert cmd.zfs_unmount("p/v") == ["zfs", "unmount", "p/v"]
    assert cmd.zfs_get(["p/a"], ["type", "used"], recursive=True) == [
        "zfs", "get", "-H", "-p", "-r", "-o", "name,property,value", "type,used", "p/a",
    ]  # fmt: skip


def test_zpool_builders() -> None:
    assert cmd.zpool_list("tank") == ["zpool", "list", "-H", "-o", "name,health", "tank"]
    assert cmd.zpool_create("t", Path("/tmp/v"), Path("/tmp/m")) == [
        "zpool", "create", "-m", "/tmp/m", "t", "/tmp/v",
    ]  # fmt: skip
    assert cmd.zpool_destroy("t") == ["zpool", "destroy", "-f", "t"]


def test_hostile_name_stays_one_argument() -> None:
    # Builders never split or interpret: a (wrongly unvalidated) value is one argv item.
    argv = cmd.zfs_snapshot("p/v", "x; rm -rf /")
    assert argv[-1] == "p/v@x; rm -rf /" and len(argv) == 3


def test_zvols_are_made_with_volmode_dev() -> None:
    from agentiso.privhelper.storage.zfs import ZVOL_PROPS

    assert ZVOL_PROPS == {"volmode": "dev"}
    assert cmd.zfs_create_zvol("p/v", 1 << 20, {"volblocksize": "16384", **ZVOL_PROPS}) == [
        "zfs", "create", "-s", "-V", str(1 << 20),
        "-o", "volblocksize=16384", "-o", "volmode=dev", "p/v",
    ]
    assert cmd.zfs_clone("p/i/b@base", "p/v/x", ZVOL_PROPS) == [
        "zfs", "clone", "-o", "volmode=dev", "p/i/b@base", "p/v/x",
    ]
