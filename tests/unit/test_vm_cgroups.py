"""Per-VM cgroup limits (privhelper/vm/engine/cgroups.py): the pure parts, and
the adapter against a directory tree standing in for cgroupfs (the real
cgroupfs is exercised by tests/integration/test_helper_hardening_net.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper.vm.engine.cgroups import (
    CgroupLimits,
    VmCgroups,
    limit_files,
    limits_for,
    parse_v1_dirs,
)
from agentiso.privhelper.vm.errors import VmUnavailable

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
SELF = """\
9:name=systemd:/system.slice/agentiso-helper.service
4:memory:/system.slice/agentiso-helper.service
3:pids:/system.slice/agentiso-helper.service
2:cpu,cpuacct:/
0::/system.slice/agentiso-helper.service
"""


def test_limits_are_the_vms_cpus_and_memory_plus_qemus_share() -> None:
    tcg = limits_for(2, 512, tb_size_mib=64, overhead_mib=256, pids_max=512)
    assert tcg == CgroupLimits(cpu_quota_us=200_000, memory_bytes=832 * 2**20, pids_max=512)
    kvm = limits_for(1, 256, tb_size_mib=0, overhead_mib=128, pids_max=64)
    assert kvm.memory_bytes == 384 * 2**20 and kvm.cpu_quota_us == 100_000
    files = limit_files(tcg)
    assert files["cpu"] == [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "200000")]
    assert files["memory"] == [("memory.limit_in_bytes", str(832 * 2**20))]


def test_v1_hierarchies_are_found_with_our_place_in_each() -> None:
    dirs = parse_v1_dirs(HYBRID_MOUNTS, SELF)
    assert dirs == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory/system.slice/agentiso-helper.service"),
        "pids": Path("/sys/fs/cgroup/pids/system.slice/agentiso-helper.service"),
    }


@pytest.mark.parametrize(
    ("mounts", "self_cgroup"),
    [
        ("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "0::/user.slice\n"),  # pure v2
        (HYBRID_MOUNTS.replace(",pids", ""), SELF.replace("3:pids", "3:nopids")),  # no pids
        ("", ""),
        ("garbage\n\n", "::\nx\n"),
    ],
)
def test_without_all_three_controllers_there_are_no_limits(
    mounts: str, self_cgroup: str
) -> None:
    assert parse_v1_dirs(mounts, self_cgroup) == {}


def _fake(tmp: Path) -> VmCgroups:
    roots = {c: tmp / c / "agentiso-tag" for c in ("cpu", "memory", "pids")}
    return VmCgroups(roots)


def test_place_writes_the_limits_and_the_pid_and_remove_cleans_up(tmp_path: Path) -> None:
    cg = _fake(tmp_path)
    cg.place("vm1", 4242, limits_for(1, 192, tb_size_mib=64, overhead_mib=256, pids_max=512))
    assert (cg.path("memory", "vm1") / "memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert (cg.path("cpu", "vm1") / "cpu.cfs_quota_us").read_text() == "100000"
    assert (cg.path("pids", "vm1") / "pids.max").read_text() == "512"
    assert (cg.path("pids", "vm1") / "cgroup.procs").read_text() == "4242"
    # A plain directory with files is not empty, so rmdir fails like a busy
    # cgroup would not: clear the stand-in files first (cgroupfs has no files).
    for ctrl in ("cpu", "memory", "pids"):
        for f in cg.path(ctrl, "vm1").iterdir():
            f.unlink()
    assert cg.remove("vm1")
    assert not any((tmp_path / c / "agentiso-tag").exists() for c in ("cpu", "memory", "pids"))
    assert cg.remove("vm1")  # again: nothing to do


def test_a_failed_write_is_a_typed_error_saying_how_to_go_without(tmp_path: Path) -> None:
    cg = VmCgroups({c: tmp_path / "missing" / c for c in ("cpu", "memory", "pids")})
    (tmp_path / "missing").write_text("a file where a directory must be")
    with pytest.raises(VmUnavailable, match="cgroup_limits = false"):
        cg.place("vm1", 1, limits_for(1, 1, tb_size_mib=0, overhead_mib=0, pids_max=1))


def test_no_hierarchies_means_unavailable_and_inert(tmp_path: Path) -> None:
    cg = VmCgroups({})
    assert not cg.available
    assert cg.remove("x") and cg.gc(set()) == []
    assert not VmCgroups.detect("t", proc=tmp_path).available  # unreadable /proc: none
