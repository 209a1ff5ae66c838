"""Boot templates, the pure parts (privhelper/vms/templates.py): the key of an
image build and shape, and which VmStart may resume a template."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper import images
from agentiso.privhelper.config import parse_config
from agentiso.privhelper.errors import ConfigError
from agentiso.privhelper.registry import Registry, SnapshotRecord, VolumeRecord
from agentiso.privhelper.vms.templates import (
    POOL_OWNER,
    SNAPSHOT,
    TEMPLATE_OWNER,
    claimable,
    clone_mark,
    is_template,
    migrate_owner,
    source_of,
    stale_rams,
    template_key,
    template_name,
)
from agentiso.protocol import helper as hp


def image(rootfs: str = "a" * 64, cmdline: str = "console=ttyS0", name: str = "minimal"
          ) -> images.Image:
    files = {f: {"sha256": h, "size": 1} for f, h in
             (("vmlinuz", "b" * 64), ("initrd.img", "c" * 64), ("rootfs.img", rootfs))}
    manifest = msgspec.convert({"name": name, "cmdline": cmdline, "files": files},
                               images.Manifest)
    return images.Image(name=name, directory=Path("/nonexistent"), manifest=manifest)


def test_the_key_changes_with_the_image_build_and_the_shape() -> None:
    base = template_key(image(), 1, 256)
    assert base == template_key(image(), 1, 256)  # stable
    assert len(base) == 16 and template_name(base) == "tpl-" + base
    others = {
        template_key(image(rootfs="d" * 64), 1, 256),  # a rebuilt root filesystem
        template_key(image(cmdline="console=ttyS0 quiet"), 1, 256),
        template_key(image(name="dev"), 1, 256),
        template_key(image(), 2, 256),
        template_key(image(), 1, 512),
    }
    assert base not in others and len(others) == 5
    # Shared memory changes what the saved state holds: another template.
    assert template_key(image(), 1, 256, share_memory=True) not in {base, *others}


def volume(**kw: object) -> VolumeRecord:
    fields: dict[str, object] = dict(key="v1", owner=1000, name="ws", created=0.0,
                                     origin="image:minimal", size_bytes=1, image="minimal")
    fields.update(kw)
    return VolumeRecord(**fields)  # type: ignore[arg-type]


START = hp.VmStart(id=0, name="ws", volume="ws")


def test_only_a_fresh_volume_started_plainly_with_a_network_is_claimable() -> None:
    assert claimable(volume(), START)
    assert claimable(volume(pristine_clone_of=clone_mark("k")), START)  # a retried start
    refused = [
        (volume(), msgspec.structs.replace(START, network=None)),  # no NIC for the identity
        (volume(), msgspec.structs.replace(START, resume_snapshot="s")),
        (volume(), msgspec.structs.replace(
            START, resume_from=hp.FromSnapshot(volume="o", snapshot="s"))),
        (volume(machine_id="0" * 32), START),  # it booted before: not a new machine
        (volume(snapshots=[SnapshotRecord(name="s", created=0.0)]), START),
        (volume(origin="snapshot:o@s"), START),  # a clone of the user's own snapshot
        (volume(pristine_clone_of="vabc@s"), START),
    ]
    for vol, req in refused:
        assert not claimable(vol, req), (vol, req)


def test_templates_are_the_helpers_own_volumes_by_name() -> None:
    assert is_template(volume(owner=TEMPLATE_OWNER, name="tpl-0123456789abcdef"))
    assert not is_template(volume(owner=TEMPLATE_OWNER, name="ws"))
    assert not is_template(volume(owner=1000, name="tpl-0123456789abcdef"))
    assert not is_template(volume(owner=0, name="tpl-0123456789abcdef"))  # root's own
    # No user has the helper's owners, root included.
    assert TEMPLATE_OWNER > 2**31 and POOL_OWNER > 2**31 and TEMPLATE_OWNER != POOL_OWNER


def test_templates_root_owned_before_are_moved_to_their_own_owner() -> None:
    reg = Registry(Path("/nonexistent"))
    snap = SnapshotRecord(name=SNAPSHOT, created=0.0, memory_file="m.mem", vcpus=1,
                          memory_mib=256)
    old = reg.add_volume(0, "tpl-0123456789abcdef", "image:minimal", 1 << 30, "minimal")
    old.snapshots.append(snap)
    fake = reg.add_volume(0, "tpl-fedcba9876543210", "image:minimal", 1 << 30, "minimal")
    mine = reg.add_volume(0, "ws", "image:minimal", 1 << 30, "minimal")
    mine.snapshots.append(snap)
    assert migrate_owner(reg) == ["tpl-0123456789abcdef"]
    assert old.owner == TEMPLATE_OWNER
    assert fake.owner == 0 and mine.owner == 0  # not templates: root's own
    assert migrate_owner(reg) == []  # once


def test_the_source_carries_the_saved_mac_and_secret() -> None:
    snap = SnapshotRecord(name="booted", created=0.0, memory_file="v-booted.mem",
                          address="10.42.0.7", vcpus=1, memory_mib=256, secret="ab")
    src = source_of(snap)
    assert src.memory_file == "v-booted.mem" and src.secret == "ab"
    assert src.old_mac is not None and src.old_mac.endswith(":07")


def test_config_defaults_and_refusals() -> None:
    cfg = parse_config("")
    assert cfg.templates.use and cfg.templates.build == "on-miss"
    assert parse_config("[templates]\nshare_memory = true\n").templates.share_memory
    assert parse_config('[templates]\nbuild = "on-miss"\n').templates.build == "on-miss"
    for bad in ('[templates]\nbuild = "always"\n', "[templates]\nsize = 3\n",
                '[templates]\nuse = "yes"\n', '[templates]\nshare_memory = "on"\n',
                "[templates]\nram_keep_s = -1\n", "[templates]\nram_keep_s = 1e9\n",
                '[templates]\nram_keep_s = "2m"\n'):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_a_users_ram_copy_is_kept_while_they_run_a_vm_and_ram_keep_s_after() -> None:
    rams = [("k1", 1001), ("k2", 1001), ("k1", 1002), ("k1", 1003)]
    seen = {1001: 100.0, 1002: 50.0}  # 1003: never seen running (its claim failed)
    # 1001 runs a VM: kept however long ago; 1002 stopped 70 s ago, 1003 unknown.
    assert stale_rams(rams, {1001}, seen, 120.0, 60.0) == [("k1", 1002), ("k1", 1003)]
    assert stale_rams(rams, set(), seen, 120.0, 60.0) == [("k1", 1002), ("k1", 1003)]
    assert stale_rams(rams, set(), seen, 160.0, 60.0) == rams  # 1001's 60 s are over too
    assert stale_rams(rams, set(), seen, 100.0, 0.0) == rams  # 0: dropped at once
    assert stale_rams(rams, {1001, 1002, 1003}, {}, 1e9, 0.0) == []  # running: never


def test_the_ram_after_a_state_is_copied_with_its_holes_and_found_again(
    tmp_path: Path,
) -> None:
    from agentiso.privhelper.vm.engine.snapshots import (
        RAM_ALIGN,
        append_ram,
        copy_extents,
        data_extents,
        ram_offset,
    )
    from agentiso.privhelper.vm.errors import LaunchError, VmUnavailable

    mib = 1 << 20
    ram = os.memfd_create("t-ram")
    state = os.open(tmp_path / "state", os.O_RDWR | os.O_CREAT, 0o600)
    back = os.memfd_create("t-back")
    try:
        os.ftruncate(ram, 4 * mib)
        os.pwrite(ram, b"a" * 5000, mib)  # data in the second MiB only
        os.pwrite(ram, b"z", 4 * mib - 1)
        os.write(state, b"s" * 70_001)  # a device state of any length
        append_ram(ram, state, 4 * mib)
        size = os.fstat(state).st_size
        off = ram_offset(size, 4 * mib)
        assert off % RAM_ALIGN == 0 and off >= 70_001 and size == off + 4 * mib
        assert os.pread(state, 5000, off + mib) == b"a" * 5000
        assert os.pread(state, 1, off + 4 * mib - 1) == b"z"
        assert os.pread(state, 10, off) == bytes(10)  # a hole reads as zeros
        os.ftruncate(back, 4 * mib)
        copy_extents(state, off, back, 0, 4 * mib)
        assert os.pread(back, 4 * mib, 0) == os.pread(ram, 4 * mib, 0)
        # Holes stay holes: far less than the 4 MiB is data.
        assert sum(n for _, n in data_extents(back, 0, 4 * mib)) < 2 * mib
        for bad_size in (4 * mib, 4 * mib + 1, 100):  # no RAM, or not page aligned
            with pytest.raises(LaunchError):
                ram_offset(bad_size, 4 * mib)
        with pytest.raises(VmUnavailable):  # an fd that is not the VM's RAM (any more)
            append_ram(state, back, 4 * mib)
    finally:
        for fd in (ram, state, back):
            os.close(fd)


def test_migrate_capabilities_add_ignore_shared_only_when_asked() -> None:
    from agentiso.privhelper.vm.engine.snapshots import migrate_capabilities

    off = migrate_capabilities(False)["capabilities"]
    on = migrate_capabilities(True)["capabilities"]
    assert isinstance(off, list) and isinstance(on, list)
    assert off == [{"capability": "events", "state": True}]
    assert on == [*off, {"capability": "x-ignore-shared", "state": True}]
