"""The free-space reserve of each storage backend on a real filesystem / pool:
below it, volume creates and snapshots are refused (limit_exceeded) before
anything is made; above it they work."""

from __future__ import annotations

import secrets
from pathlib import Path

import anyio
import pytest

from agentiso.privhelper.storage import FromBase, ZfsConfig
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.quotas import QuotaExceeded, free_bytes
from agentiso.privhelper.storage.zfs import ZfsBackend
from tests.harness.zfs import ZfsPool

MIB = 1024 * 1024
HUGE = 1 << 60

pytestmark = pytest.mark.anyio


def base_image(tmp: Path) -> Path:
    src = tmp / "base.raw"
    with src.open("wb") as f:
        f.truncate(64 * MIB)
    return src


async def exercise(b: Qcow2Backend | ZfsBackend, source: Path) -> None:
    await b.import_base("b", source)
    b.reserve_free_bytes = 0
    await b.create_volume("v", FromBase("b"))
    b.reserve_free_bytes = HUGE
    with pytest.raises(QuotaExceeded, match="reserve"):
        await b.create_volume("w", FromBase("b"))
    with pytest.raises(QuotaExceeded, match="reserve"):
        await b.snapshot("v", "s")
    assert [v.name for v in await b.list_volumes()] == ["v"]
    assert (await b.volume_info("v")).snapshots == ()
    b.reserve_free_bytes = 1  # any real filesystem has a byte free
    await b.snapshot("v", "s")
    await b.create_volume("w", FromBase("b"))


async def test_qcow2_reserve(tmp_path: Path) -> None:
    b = Qcow2Backend(tmp_path / "storage", min_size=MIB)
    await b.setup()
    assert free_bytes(tmp_path) < HUGE
    await exercise(b, base_image(tmp_path))
    # Importing a base (a user's first volume of an image does) too.
    b.reserve_free_bytes = HUGE
    with pytest.raises(QuotaExceeded, match="reserve"):
        await b.import_base("c", base_image(tmp_path))
    assert [x.name for x in await b.list_bases()] == ["b"]


async def test_zfs_reserve(zfs_pool: ZfsPool, tmp_path: Path) -> None:
    root = f"{zfs_pool.name}/r{secrets.token_hex(3)}"
    b = ZfsBackend(ZfsConfig(dataset=root, zvols=False), min_size=MIB)
    try:
        await b.setup()
        await exercise(b, base_image(tmp_path))
    finally:
        await anyio.run_process(["zfs", "destroy", "-R", root], check=False)
