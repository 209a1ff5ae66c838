"""Registry ownership and persistence; limit checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper.atomicfile import atomic_write
from agentiso.privhelper.errors import RequestFailed
from agentiso.privhelper.limits import GiB, LimitsConfig, Usage, check
from agentiso.privhelper.registry import Registry
from agentiso.protocol.errors import ErrorCode


def test_names_are_per_owner_and_others_are_invisible(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.json")
    a = reg.add_volume(1000, "ws", "image:minimal", GiB)
    b = reg.add_volume(1001, "ws", "image:minimal", GiB)
    assert a.key != b.key
    assert reg.volume(1000, "ws") is a
    assert reg.volume(1001, "ws") is b
    with pytest.raises(RequestFailed) as info:
        reg.volume(1002, "ws")
    assert info.value.code == ErrorCode.NOT_FOUND
    # Same message as for a name nobody uses: existence does not leak.
    with pytest.raises(RequestFailed) as info2:
        reg.volume(1002, "nothing")
    assert str(info.value).replace("ws", "X") == str(info2.value).replace("nothing", "X")


def test_duplicate_names_for_one_owner_are_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.json")
    reg.add_volume(1000, "ws", "image:minimal", GiB)
    with pytest.raises(RequestFailed) as info:
        reg.add_volume(1000, "ws", "image:minimal", GiB)
    assert info.value.code == ErrorCode.ALREADY_EXISTS
    v = reg.volume(1000, "ws")
    reg.add_vm(1000, "m", v.key, 1, 256)
    with pytest.raises(RequestFailed):
        reg.add_vm(1000, "m", v.key, 1, 256)


def test_registry_survives_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    reg = Registry(path)
    v = reg.add_volume(1000, "ws", "image:minimal", GiB)
    reg.add_vm(1000, "m", v.key, 2, 512)
    reg.save()
    again = Registry.load(path)
    assert again.data == reg.data
    assert oct(path.stat().st_mode)[-3:] == "600"


def test_corrupt_registry_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(RequestFailed) as info:
        Registry.load(path)
    assert info.value.code == ErrorCode.INTERNAL


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"1")
    atomic_write(tmp_path / "f", b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    assert (tmp_path / "f").read_bytes() == b"2"


LIMITS = LimitsConfig(per_uid_vms=2, per_uid_memory_mib=1024, per_uid_disk_gib=10,
                      per_uid_volumes=3, host_vms=3, host_memory_mib=2048, host_disk_gib=20)


@pytest.mark.parametrize(
    ("uid", "host", "delta", "what"),
    [
        (Usage(vms=2), Usage(vms=2), Usage(vms=1), "VMs per user"),
        (Usage(memory_mib=900), Usage(memory_mib=900), Usage(memory_mib=256), "memory per user"),
        (Usage(disk_bytes=9 * GiB), Usage(), Usage(disk_bytes=2 * GiB), "disk per user"),
        (Usage(volumes=3), Usage(volumes=3), Usage(volumes=1), "volumes per user"),
        (Usage(), Usage(vms=3), Usage(vms=1), "VMs on this host"),
        (Usage(), Usage(memory_mib=2000), Usage(memory_mib=256), "memory on this host"),
        (Usage(), Usage(disk_bytes=19 * GiB), Usage(disk_bytes=2 * GiB), "disk on this host"),
    ],
)
def test_each_limit_is_enforced(uid: Usage, host: Usage, delta: Usage, what: str) -> None:
    with pytest.raises(RequestFailed) as info:
        check(LIMITS, uid, host, delta)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert what.split()[-1] in info.value.message


def test_within_limits_passes_and_shrinking_is_always_allowed() -> None:
    check(LIMITS, Usage(vms=1), Usage(vms=1), Usage(vms=1, memory_mib=512))
    # Already over (limits lowered by the operator): freeing is still allowed.
    check(LIMITS, Usage(vms=9), Usage(vms=9), Usage(vms=0))
