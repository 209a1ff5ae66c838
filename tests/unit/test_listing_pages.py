"""Listings larger than a frame are paged: the pure pager, the helper's
AdminList over a registry far larger than a frame, and the client joining
pages (against a scripted fake helper)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from agentiso.privhelper.paging import page
from agentiso.privhelper.registry import Registry, SnapshotRecord
from agentiso.privhelper.vms.admin import Admin
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import RemoteProtocolError
from tests.unit.test_helper_client import FakeHelper, connected


def test_page_fits_the_budget_and_always_moves_on() -> None:
    items = [b"x" * 100] * 10  # 102 bytes each encoded
    got, nxt = page(items, 0, budget=350)
    assert len(got) == 3 and nxt == 3
    got, nxt = page(items, 9, budget=350)
    assert len(got) == 1 and nxt is None
    # One item larger than the budget still makes a page of one.
    got, nxt = page([b"y" * 1000, b"z"], 0, budget=10)
    assert got == [b"y" * 1000] and nxt == 1
    assert page(items, 10) == ([], None)
    assert page(items, 1000) == ([], None)
    assert page([], 0) == ([], None)


async def _admin_listing(reg: Registry, cursor: int) -> hp.AdminListing:
    admin = Admin(ws=SimpleNamespace(registry=reg), engine=None, views=None)  # type: ignore[arg-type]
    return await admin.admin_list(hp.AdminList(id=7, cursor=cursor), None)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_admin_list_of_a_registry_larger_than_a_frame_comes_in_pages(
    tmp_path: Path,
) -> None:
    reg = Registry(tmp_path / "registry.json")
    for i in range(12_000):
        v = reg.add_volume(1000 + i % 500, f"volume-{i:05d}-{'n' * 40}", "image:minimal", 1 << 30)
        v.snapshots = [SnapshotRecord(name=f"snap-{j}-{'s' * 30}", created=0.0) for j in range(3)]
    whole = len(msgspec.msgpack.encode([*reg.volumes()]))
    assert whole > hp.HELPER_MAX_FRAME  # one answer could not carry it
    seen: list[str] = []
    cursor: int | None = 0
    pages = 0
    while cursor is not None:
        got = await _admin_listing(reg, cursor)
        frame = hp.response_codec.encode(got)
        assert len(frame) <= hp.LISTING_PAGE_BYTES + 1024 < hp.HELPER_MAX_FRAME
        assert got.id == 7
        seen += [v.key for v in got.volumes]
        cursor = got.next_cursor
        pages += 1
    assert seen == [v.key for v in reg.volumes()]  # all, once, in order
    assert pages >= 2


def _volume(i: int) -> hp.VolumeInfo:
    return hp.VolumeInfo(id=0, name=f"v{i}", size_bytes=1 << 30, used_bytes=0, created=0.0,
                         origin="image:minimal", snapshots=[])


@pytest.mark.anyio
async def test_client_joins_pages(tmp_path: Path) -> None:
    cursors: list[int] = []

    async def serve(h: FakeHelper) -> None:
        while True:
            r = await h.read()
            assert isinstance(r, hp.VolumeList)
            cursors.append(r.cursor)
            nxt = r.cursor + 2 if r.cursor + 2 < 5 else None
            await h.respond(hp.Volumes(
                id=r.id, volumes=[_volume(i) for i in range(r.cursor, min(r.cursor + 2, 5))],
                next_cursor=nxt,
            ))

    async with connected(tmp_path, serve) as helper:
        got = await helper.volume_list(timeout=5)
    assert [v.name for v in got.volumes] == ["v0", "v1", "v2", "v3", "v4"]
    assert got.next_cursor is None and cursors == [0, 2, 4]


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["vm_list", "admin_list", "volume_list"])
async def test_a_cursor_that_does_not_move_on_is_a_protocol_error(
    tmp_path: Path, method: str,
) -> None:
    answers: dict[str, Any] = {
        "vm_list": lambda rid: hp.Vms(id=rid, vms=[], next_cursor=0),
        "admin_list": lambda rid: hp.AdminListing(id=rid, volumes=[], vms=[], next_cursor=0),
        "volume_list": lambda rid: hp.Volumes(id=rid, volumes=[], next_cursor=0),
    }

    async def serve(h: FakeHelper) -> None:
        while True:
            r = await h.read()
            await h.respond(answers[method](r.id))

    async with connected(tmp_path, serve) as helper:
        with pytest.raises(RemoteProtocolError, match="did not move on"):
            await getattr(helper, method)(timeout=5)
