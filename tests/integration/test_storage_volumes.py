"""The volume suite, run against both backends with real tools.

* ``qcow2``: real qemu-img files in a temporary directory;
* ``zfs``: a real pool on zfs-fuse (file mode: zfs-fuse has no zvols), started
  by :mod:`tests.harness.zfs` and destroyed afterwards.

Data is written and checked with ``qemu-io`` through the path and format the
backend's :meth:`attachment` hands to the VM engine, i.e. the way QEMU sees it.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from agentiso.privhelper.storage import (
    FromBase,
    FromSnapshot,
    SnapshotPlan,
    VolumeBackend,
    ZfsConfig,
)
from agentiso.privhelper.storage.errors import (
    AlreadyExists,
    BackendUnavailable,
    CorruptState,
    HasDependents,
    InvalidName,
    InvalidSize,
    NotFound,
)
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.zfs import ZfsBackend
from tests.harness.zfs import ZfsPool, pool_datasets

MIB = 1024 * 1024
BASE_SIZE = 64 * MIB

pytestmark = pytest.mark.anyio




@pytest.fixture(scope="module")
def base_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw image with 0x11 in its first MiB, as images/<name>/rootfs.img would be."""
    path = tmp_path_factory.mktemp("src") / "rootfs.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(BASE_SIZE)], check=True)
    qemu_io(path, "raw", f"write -P 0x11 0 {MIB}")
    return path


def qemu_io(path: Path, fmt: str, command: str) -> str:
    """Run one qemu-io command; a failed pattern check raises AssertionError."""
    res = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "failed" not in out.lower(), f"qemu-io {command!r}: {out}"
    return out


@pytest.fixture(params=["qcow2", "zfs", "zfs-zvol"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, base_source: Path
) -> AsyncIterator[VolumeBackend]:
    b: VolumeBackend
    if request.param == "qcow2":
        b = Qcow2Backend(tmp_path / "storage", min_size=MIB)
    else:
        pool: ZfsPool = request.getfixturevalue("zfs_pool")
        root = f"{pool.name}/t{secrets.token_hex(3)}"
        zvols = request.param == "zfs-zvol"
        b = ZfsBackend(ZfsConfig(dataset=root, zvols=zvols or None), min_size=MIB)
    try:
        await b.setup()
    except BackendUnavailable as exc:
        await _drop_root(b)
        pytest.skip(reason=f"no zvols on this pool: {exc}")
    try:
        await b.import_base("minimal", base_source)
        yield b
    finally:
        await _drop_root(b)


async def _drop_root(b: VolumeBackend) -> None:
    if isinstance(b, ZfsBackend):
        # -R: whatever a failed test left (clones included) goes with the root.
        await anyio.run_process(["zfs", "destroy", "-R", b.ds.root], check=False)


async def write(
    b: VolumeBackend, vol: str, pattern: int, offset: int = 0, length: int = MIB
) -> None:
    top = (await b.attachment(vol)).top
    qemu_io(top.path, top.format, f"write -P {pattern:#x} {offset} {length}")


async def check(
    b: VolumeBackend, vol: str, pattern: int, offset: int = 0, length: int = MIB
) -> None:
    top = (await b.attachment(vol)).top
    qemu_io(top.path, top.format, f"read -P {pattern:#x} {offset} {length}")


async def test_volume_starts_as_its_base(backend: VolumeBackend) -> None:
    info = await backend.create_volume("ws1", FromBase("minimal"))
    assert info.virtual_size == BASE_SIZE
    assert info.origin == "base:minimal"
    await check(backend, "ws1", 0x11)
    # Copy-on-write: a fresh volume holds next to nothing of its own.
    assert info.used_bytes < 4 * MIB
    [base] = await backend.list_bases()
    assert base.name == "minimal" and base.dependents == ("ws1",)
    # Disks are not readable by other local users.
    att = await backend.attachment("ws1")
    for node in att.chain:
        if node.protocol == "file":
            assert node.path.stat().st_mode & 0o077 == 0, node.path


async def test_snapshot_change_rollback(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"))
    await write(backend, "ws1", 0xAA)
    await backend.snapshot("ws1", "s1")
    await write(backend, "ws1", 0xBB)
    await write(backend, "ws1", 0xBB, 8 * MIB)
    await backend.snapshot("ws1", "s2")
    await write(backend, "ws1", 0xCC)
    info = await backend.rollback("ws1", "s1")
    await check(backend, "ws1", 0xAA)
    await check(backend, "ws1", 0x00, 8 * MIB)
    # Rollback discards later snapshots (documented semantics, like zfs rollback -r).
    assert [s.name for s in info.snapshots] == ["s1"]
    # And the volume keeps working after a rollback: change and roll back again.
    await write(backend, "ws1", 0xDD)
    await backend.rollback("ws1", "s1")
    await check(backend, "ws1", 0xAA)


async def test_clone_while_original_keeps_changing(backend: VolumeBackend) -> None:
    await backend.create_volume("orig", FromBase("minimal"))
    await write(backend, "orig", 0xAA)
    await backend.snapshot("orig", "s1")
    clone = await backend.create_volume("clone", FromSnapshot("orig", "s1"))
    assert clone.origin == "snapshot:orig@s1"
    await write(backend, "orig", 0xBB)
    await check(backend, "clone", 0xAA)
    await write(backend, "clone", 0xCC, 2 * MIB)
    await check(backend, "orig", 0xBB)
    await check(backend, "orig", 0x00, 2 * MIB)
    info = await backend.volume_info("orig")
    assert info.snapshots[0].dependents == ("clone",)


async def test_delete_snapshot_refused_while_cloned_then_merged(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"))
    await write(backend, "ws1", 0xAA)
    await backend.snapshot("ws1", "s1")
    await write(backend, "ws1", 0xBB, 4 * MIB)
    await backend.snapshot("ws1", "s2")
    await write(backend, "ws1", 0xCC, 8 * MIB)
    await backend.create_volume("c1", FromSnapshot("ws1", "s1"))
    with pytest.raises(HasDependents) as err:
        await backend.delete_snapshot("ws1", "s1")
    assert err.value.dependents == ("c1",)
    assert err.value.code == "conflict"
    # Rolling back past a cloned snapshot is refused too.
    await backend.snapshot("c1", "k1")
    await backend.create_volume("c2", FromSnapshot("ws1", "s2"))
    with pytest.raises(HasDependents):
        await backend.rollback("ws1", "s1")
    await backend.destroy_volume("c2")
    await backend.destroy_volume("c1")
    # Nothing depends on it now: deleting merges its data into what is above it.
    await backend.delete_snapshot("ws1", "s1")
    await backend.delete_snapshot("ws1", "s2")
    assert (await backend.volume_info("ws1")).snapshots == ()
    await check(backend, "ws1", 0xAA)
    await check(backend, "ws1", 0xBB, 4 * MIB)
    await check(backend, "ws1", 0xCC, 8 * MIB)
    await check(backend, "ws1", 0x11, 0, 0)  # base still reachable below
    with pytest.raises(NotFound):
        await backend.delete_snapshot("ws1", "s1")


async def test_clone_outlives_its_origin(backend: VolumeBackend) -> None:
    await backend.create_volume("orig", FromBase("minimal"))
    await write(backend, "orig", 0xAA)
    await backend.snapshot("orig", "s1")
    await write(backend, "orig", 0xBB, 2 * MIB)
    await backend.snapshot("orig", "s2")
    await backend.create_volume("c1", FromSnapshot("orig", "s1"))
    await backend.create_volume("c2", FromSnapshot("orig", "s2"))
    await backend.snapshot("c2", "s1")  # same snapshot name as the origin's: no clash
    await backend.destroy_volume("orig")
    names = sorted(v.name for v in await backend.list_volumes())
    assert names == ["c1", "c2"]
    await check(backend, "c1", 0xAA)
    await check(backend, "c1", 0x00, 2 * MIB)
    await check(backend, "c2", 0xBB, 2 * MIB)
    assert [s.name for s in (await backend.volume_info("c2")).snapshots] == ["s1"]
    await backend.destroy_volume("c2")
    await check(backend, "c1", 0xAA)
    await backend.destroy_volume("c1")
    assert await backend.list_volumes() == []


async def test_destroy_leaves_nothing(backend: VolumeBackend) -> None:
    before = _leftovers(backend)
    await backend.create_volume("ws1", FromBase("minimal"))
    await write(backend, "ws1", 0xAA)
    await backend.snapshot("ws1", "s1")
    await backend.create_volume("ws2", FromSnapshot("ws1", "s1"))
    await backend.snapshot("ws2", "t1")
    await backend.destroy_volume("ws1")
    await backend.destroy_volume("ws2")
    assert await backend.list_volumes() == []
    assert _leftovers(backend) == before
    with pytest.raises(NotFound):
        await backend.destroy_volume("ws1")
    await backend.delete_base("minimal")
    assert await backend.list_bases() == []


def _leftovers(b: VolumeBackend) -> list[str]:
    """What exists on disk / in the pool for the backend, by the system's own tools."""
    if isinstance(b, Qcow2Backend):
        res = subprocess.run(
            ["ls", "-A", str(b.layout.layers), str(b.layout.volumes), str(b.layout.tmp)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [line for line in res.stdout.splitlines() if line and not line.endswith(":")]
    assert isinstance(b, ZfsBackend)
    return [d for d in pool_datasets(b.ds.pool) if d.startswith(b.ds.root + "/")]


async def test_base_with_volumes_cannot_be_deleted(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"))
    with pytest.raises(HasDependents):
        await backend.delete_base("minimal")
    with pytest.raises(AlreadyExists):
        await backend.import_base("minimal", Path("/nonexistent"))


async def test_grow(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"), size=96 * MIB)
    assert (await backend.attachment("ws1")).virtual_size == 96 * MIB
    await write(backend, "ws1", 0xAA, 90 * MIB)
    info = await backend.grow_volume("ws1", 128 * MIB)
    assert info.virtual_size == 128 * MIB
    att = await backend.attachment("ws1")
    argv = ["qemu-img", "info", "--output=json", "-f", att.top.format, str(att.top.path)]
    out = (await anyio.run_process(argv)).stdout.decode()
    assert f'"virtual-size": {128 * MIB}' in out
    await check(backend, "ws1", 0xAA, 90 * MIB)
    await check(backend, "ws1", 0x11)
    with pytest.raises(InvalidSize):
        await backend.grow_volume("ws1", 64 * MIB)
    with pytest.raises(InvalidSize):
        await backend.create_volume("ws2", FromBase("minimal"), size=32 * MIB)
    # Snapshot keeps the size it was taken at; rollback restores it.
    await backend.snapshot("ws1", "s1")
    await backend.grow_volume("ws1", 256 * MIB)
    info = await backend.rollback("ws1", "s1")
    assert info.virtual_size == 128 * MIB


async def test_used_sizes(backend: VolumeBackend, tmp_path: Path) -> None:
    rnd = tmp_path / "random"
    rnd.write_bytes(secrets.token_bytes(8 * MIB))
    await backend.create_volume("ws1", FromBase("minimal"))
    # Random data: compression (zfs) must not hide it.
    top = (await backend.attachment("ws1")).top
    await anyio.run_process(
        ["qemu-io", "-f", top.format, "-c", f"write -s {rnd} 0 {8 * MIB}", str(top.path)]
    )
    qemu_io(top.path, top.format, f"write -P 0x5a {16 * MIB} {8 * MIB}")
    await backend.snapshot("ws1", "s1")
    await write(backend, "ws1", 0x77, 16 * MIB, 8 * MIB)
    info = await backend.volume_info("ws1")
    assert info.used_bytes >= 8 * MIB, info
    # The snapshot holds the 8 MiB since overwritten in the volume (zfs compresses
    # the constant pattern, so only check it is counted at all).
    assert info.snapshots[0].used_bytes > 0, info


async def test_typed_not_found_and_exists(backend: VolumeBackend) -> None:
    with pytest.raises(NotFound) as nf:
        await backend.create_volume("ws1", FromBase("nope"))
    assert nf.value.code == "not_found"
    with pytest.raises(NotFound):
        await backend.create_volume("ws1", FromSnapshot("nope", "s1"))
    await backend.create_volume("ws1", FromBase("minimal"))
    with pytest.raises(AlreadyExists):
        await backend.create_volume("ws1", FromBase("minimal"))
    await backend.snapshot("ws1", "s1")
    with pytest.raises(AlreadyExists):
        await backend.snapshot("ws1", "s1")
    for call in (
        backend.rollback("ws1", "zz"),
        backend.delete_snapshot("ws1", "zz"),
        backend.attachment("zz"),
        backend.grow_volume("zz", 128 * MIB),
        backend.volume_info("zz"),
    ):
        with pytest.raises(NotFound):
            await call


BAD_NAMES = [
    "a/b", "..", "../x", "a\0b", "x" * 300, "x" * 64, "a;rm -rf /", "$(id)", "`id`",
    "a b", "a|b", "a&b", "Upper", "", "-lead", "name\n", "a@b", "_hidden", "ä", "a.b",
]  # fmt: skip


# Validation happens before any backend I/O: the zvol variant adds nothing here.
@pytest.mark.parametrize("backend", ["qcow2", "zfs"], indirect=True)
@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
async def test_bad_names_refused(backend: VolumeBackend, bad: str) -> None:
    await backend.create_volume("good", FromBase("minimal"))
    await backend.snapshot("good", "snap")
    before = _leftovers(backend)
    node = (await backend.attachment("good")).top
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: backend.create_volume(bad, FromBase("minimal")),
        lambda: backend.create_volume("ok", FromBase(bad)),
        lambda: backend.create_volume("ok", FromSnapshot(bad, "snap")),
        lambda: backend.create_volume("ok", FromSnapshot("good", bad)),
        lambda: backend.snapshot("good", bad),
        lambda: backend.prepare_snapshot(bad, "s9"),
        lambda: backend.rollback("good", bad),
        lambda: backend.delete_snapshot(bad, "snap"),
        lambda: backend.destroy_volume(bad),
        lambda: backend.grow_volume(bad, 128 * MIB),
        lambda: backend.attachment(bad),
        lambda: backend.volume_info(bad),
        lambda: backend.import_base(bad, Path("/dev/null")),
        lambda: backend.delete_base(bad),
        # A forged plan is checked too.
        lambda: backend.commit_snapshot(SnapshotPlan(bad, "s9", None, node)),
        lambda: backend.commit_snapshot(SnapshotPlan("good", bad, None, node)),
    ]
    for call in calls:
        with pytest.raises(InvalidName) as err:
            await call()
        assert err.value.code == "invalid"
    assert _leftovers(backend) == before


BAD_SIZES: list[object] = [-1, 0, -(2**63), 2**63, 10**30, 1.5, True, "1G", None, 513, 100]


@pytest.mark.parametrize("backend", ["qcow2", "zfs"], indirect=True)
@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
async def test_bad_sizes_refused(backend: VolumeBackend, bad: object) -> None:
    await backend.create_volume("good", FromBase("minimal"))
    before = _leftovers(backend)
    with pytest.raises(InvalidSize):
        await backend.grow_volume("good", bad)  # type: ignore[arg-type]
    if bad is not None:
        with pytest.raises(InvalidSize):
            await backend.create_volume("ok", FromBase("minimal"), size=bad)  # type: ignore[arg-type]
    assert _leftovers(backend) == before
    assert (await backend.volume_info("good")).virtual_size == BASE_SIZE


async def test_garbage_after_an_interrupted_snapshot(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"))
    await write(backend, "ws1", 0xAA)
    plan = await backend.prepare_snapshot("ws1", "s1")
    # A pending snapshot is not garbage.
    assert await backend.collect_garbage() == []
    # The helper "restarts" before commit: a fresh backend on the same storage.
    if isinstance(backend, Qcow2Backend):
        fresh: VolumeBackend = Qcow2Backend(backend.layout.root, min_size=MIB)
        assert plan.new_top is not None
        found = await fresh.collect_garbage()
        assert found == [f"layer {plan.new_top.path.stem}"]
        assert plan.new_top.path.exists()  # dry run by default
        assert await fresh.collect_garbage(dry_run=False) == found
        assert not plan.new_top.path.exists()
    else:
        assert isinstance(backend, ZfsBackend)
        fresh = ZfsBackend(backend.config, min_size=MIB)
        await fresh.setup()
        assert plan.new_top is None  # nothing to leave behind
        assert await fresh.collect_garbage(dry_run=False) == []
    assert await fresh.collect_garbage() == []
    await check(fresh, "ws1", 0xAA)
    await fresh.snapshot("ws1", "s1")
    await fresh.destroy_volume("ws1")


async def test_zfs_setup_facts(zfs_pool: ZfsPool) -> None:
    """Missing pool is typed; compression falls back where lz4 is unknown; layout exists."""
    with pytest.raises(BackendUnavailable):
        await ZfsBackend(ZfsConfig(dataset=f"nopool{secrets.token_hex(3)}/x")).setup()
    b = ZfsBackend(ZfsConfig(dataset=f"{zfs_pool.name}/f{secrets.token_hex(3)}"))
    try:
        await b.setup()
        await b.setup()  # idempotent
        res = await anyio.run_process(
            ["zfs", "get", "-H", "-o", "value", "compression", b.ds.root, b.ds.volumes]
        )
        values = res.stdout.decode().split()
        assert values == [b.compression, b.compression]
        assert b.compression in ("lz4", b.config.compression_fallback)
        restarted = ZfsBackend(b.config)
        await restarted.setup()
        assert restarted.compression == b.compression
        names = pool_datasets(zfs_pool.name)
        assert b.ds.images in names and b.ds.volumes in names
        assert b.ds.probe not in names  # the zvol probe leaves nothing
    finally:
        await _drop_root(b)


async def test_two_step_snapshot_deletion(backend: VolumeBackend) -> None:
    await backend.create_volume("ws1", FromBase("minimal"))
    await write(backend, "ws1", 0xAA)
    await backend.snapshot("ws1", "s1")
    await write(backend, "ws1", 0xBB, 2 * MIB)
    await backend.snapshot("ws1", "s2")
    older = await backend.prepare_delete_snapshot("ws1", "s1")
    newest = await backend.prepare_delete_snapshot("ws1", "s2")
    assert older.stream_into is None  # an older qcow2 layer cannot be merged live
    if isinstance(backend, Qcow2Backend):
        assert newest.stream_into == (await backend.attachment("ws1")).top
        # Claiming a stream that did not happen is caught; the snapshot stays.
        with pytest.raises(CorruptState):
            await backend.commit_delete_snapshot(newest, streamed=True)
        assert len((await backend.volume_info("ws1")).snapshots) == 2
    else:
        assert newest.stream_into is None
    # Both plans stay valid: deleting s1 does not touch s2's layer or its child.
    await backend.commit_delete_snapshot(older)
    await backend.commit_delete_snapshot(newest)
    assert (await backend.volume_info("ws1")).snapshots == ()
    await check(backend, "ws1", 0xAA)
    await check(backend, "ws1", 0xBB, 2 * MIB)
    with pytest.raises(NotFound):
        await backend.commit_delete_snapshot(newest)


async def test_forged_snapshot_plan_refused(backend: VolumeBackend, tmp_path: Path) -> None:
    """A plan's opaque token becomes file names on qcow2: a forged one is refused."""
    await backend.create_volume("ws1", FromBase("minimal"))
    plan = await backend.prepare_snapshot("ws1", "s1")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    if isinstance(backend, Qcow2Backend):
        for token in (f"{'a' * 24}:../../../{victim}", "x:y", "", f"{'a' * 24}"):
            forged = dataclasses.replace(plan, token=token)
            with pytest.raises(CorruptState):
                await backend.abort_snapshot(forged)
            with pytest.raises(CorruptState):
                await backend.commit_snapshot(forged)
    assert victim.read_text() == "keep"
    await backend.abort_snapshot(plan)
    assert (await backend.volume_info("ws1")).snapshots == ()
