"""Snapshot quotas, the free-space reserve, and full-filesystem handling (pure
parts and what runs without root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper.atomicfile import StateFilesystemFull, is_full
from agentiso.privhelper.storage import quotas
from agentiso.privhelper.storage.config import StorageConfig
from agentiso.privhelper.vm.boundedlog import BoundedLog
from agentiso.protocol.errors import ErrorCode

MIB = quotas.MIB


def test_snapshot_count_quota_refuses_the_one_over() -> None:
    quotas.check_snapshot(quotas.SnapshotUse(snapshots=2), max_snapshots=3, max_memory_bytes=0)
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check_snapshot(
            quotas.SnapshotUse(snapshots=3), max_snapshots=3, max_memory_bytes=0
        )
    assert e.value.code is ErrorCode.LIMIT_EXCEEDED
    assert "4 snapshots" in e.value.message and "limit is 3" in e.value.message


def test_zero_means_none_allowed() -> None:
    with pytest.raises(quotas.QuotaExceeded):
        quotas.check_snapshot(quotas.SnapshotUse(), max_snapshots=0, max_memory_bytes=10)


def test_memory_quota_counts_the_worst_case_of_a_new_save() -> None:
    bound = quotas.memory_state_bound(256)
    assert bound == 256 * MIB + quotas.MEMORY_STATE_SLACK
    use = quotas.SnapshotUse(snapshots=1, memory_bytes=100 * MIB)
    # A disk-only snapshot is never refused for memory.
    quotas.check_snapshot(use, max_snapshots=10, max_memory_bytes=0)
    quotas.check_snapshot(use, max_snapshots=10, max_memory_bytes=100 * MIB + bound,
                          memory_bytes=bound)
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check_snapshot(use, max_snapshots=10, max_memory_bytes=100 * MIB + bound - 1,
                              memory_bytes=bound)
    assert str(100 * MIB) in e.value.message and str(bound) in e.value.message


@pytest.mark.parametrize(("free", "reserve", "need", "ok"), [
    (100, 100, 0, True), (99, 100, 0, False), (200, 100, 100, True), (200, 100, 101, False),
    (0, 0, 0, True), (-1, 0, 0, False),
])
def test_reserve(free: int, reserve: int, need: int, ok: bool) -> None:
    if ok:
        quotas.check_reserve(free, reserve, need)
    else:
        with pytest.raises(quotas.QuotaExceeded) as e:
            quotas.check_reserve(free, reserve, need)
        assert "reserve" in e.value.message


def test_free_and_file_bytes(tmp_path: Path) -> None:
    assert quotas.free_bytes(tmp_path) >= 0
    (tmp_path / "a").write_bytes(b"x" * 10)
    assert quotas.file_bytes([tmp_path / "a", tmp_path / "missing"]) == 10


def test_config_defaults_and_bounds() -> None:
    import msgspec

    cfg = StorageConfig()
    assert cfg.per_uid_snapshots > 0 and cfg.reserve_free_bytes > 0
    for bad in ({"per_uid_snapshots": -1}, {"reserve_free_bytes": -1},
                {"per_uid_memory_state_bytes": "1G"}, {"per_uid_snapshots": True}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, StorageConfig)


def test_state_full_is_typed_unavailable() -> None:
    exc = StateFilesystemFull("saving registry.json")
    assert exc.code is ErrorCode.UNAVAILABLE
    assert "registry.json" in exc.message and "free space" in exc.message
    assert is_full(OSError(28, "No space left on device"))
    assert not is_full(OSError(13, "Permission denied"))
    assert not is_full(ValueError())


def test_bounded_log_on_a_full_device_drops_and_never_raises() -> None:
    # /dev/full answers every write with ENOSPC, like a full filesystem.
    log = BoundedLog(Path("/dev/full"), 1 << 20)
    try:
        log.write(b"console line\n" * 10)
        assert log.dropped == 130
    finally:
        log.close()
