"""Volumes through the helper, as unprivileged users would use them: the
real helper process, the real qcow2 backend, the real guest image as base.

Checks ownership (two uids cannot see or touch each other's volumes, even by
the same name), limits (refused with a typed error, nothing created), and the
snapshot/clone/rollback/destroy life cycle over RPC."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import AlreadyExists, Conflict, NotFound, RemoteError
from tests.harness.images import require_image
from tests.support.helper_process import HelperProcess, run_as, running_helper

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "build" / "images"
GROUP = 64331
ALICE = 64332
BOB = 64333
GiB = 1024**3


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    require_image("minimal", tools=("qemu-img",))  # volumes only: no VM is booted
    config = textwrap.dedent(
        """
        [limits]
        per_uid_volumes = 4
        per_uid_disk_gib = 8
        """
    )
    with running_helper(
        group=GROUP, extra_args=("--images-dir", str(IMAGES)), config=config
    ) as h:
        yield h


def as_user(helper: HelperProcess, uid: int, code: str) -> list[object]:
    """Run ``code`` as ``uid`` in the helper's group with ``c`` a connected
    client; it prints JSON lines, returned parsed."""
    prog = textwrap.dedent(
        f"""
        import json, sys
        from agentiso.protocol import helper as hp
        from agentiso.protocol.blocking import BlockingHelperClient
        from agentiso.protocol.errors import RemoteError
        def out(x): print(json.dumps(x), flush=True)
        def call(msg):
            try:
                r = c.request(msg)
                return type(r).__name__
            except RemoteError as e:
                return e.code
        c = BlockingHelperClient({str(helper.socket)!r}, timeout=180)
        """
    ) + textwrap.dedent(code)
    r = run_as(uid, uid, [GROUP], prog, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_images_are_listed(helper: HelperProcess) -> None:
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        imgs = c.request(hp.ImageList(id=0))
    assert isinstance(imgs, hp.Images)
    assert "minimal" in [i.name for i in imgs.images]


def test_two_uids_cannot_see_or_touch_each_others_volumes(helper: HelperProcess) -> None:
    create = """
        r = c.request(hp.VolumeCreate(id=0, name="ws", source=hp.FromImage(image="minimal")))
        out([r.name, r.origin, r.size_bytes > 0])
        out([v.name for v in c.request(hp.VolumeList(id=0)).volumes])
    """
    assert as_user(helper, ALICE, create) == [["ws", "image:minimal", True], ["ws"]]
    # Bob may use the same name: names are per user.
    assert as_user(helper, BOB, create) == [["ws", "image:minimal", True], ["ws"]]
    probe = """
        out(call(hp.VolumeGet(id=0, name="alice-only")))
        out(call(hp.SnapshotCreate(id=0, volume="alice-only", snapshot="s")))
        out(call(hp.VolumeDestroy(id=0, name="alice-only")))
        out(call(hp.VolumeCreate(id=0, name="x",
                 source=hp.FromSnapshot(volume="alice-only", snapshot="s1"))))
        out([v.name for v in c.request(hp.VolumeList(id=0)).volumes])
    """
    as_user(helper, ALICE, """
        c.request(hp.VolumeCreate(id=0, name="alice-only", source=hp.FromImage(image="minimal")))
        c.request(hp.SnapshotCreate(id=0, volume="alice-only", snapshot="s1"))
    """)
    assert as_user(helper, BOB, probe) == [
        "not_found", "not_found", "not_found", "not_found", ["ws"]
    ]
    # Alice's volume is untouched.
    assert as_user(helper, ALICE, probe)[0] == "VolumeInfo"
    for uid in (ALICE, BOB):
        as_user(helper, uid, """
            for v in c.request(hp.VolumeList(id=0)).volumes:
                for s in v.snapshots:
                    c.request(hp.SnapshotDelete(id=0, volume=v.name, snapshot=s.name))
                c.request(hp.VolumeDestroy(id=0, name=v.name))
        """)


def test_limits_refuse_with_typed_error_and_create_nothing(helper: HelperProcess) -> None:
    res = as_user(helper, ALICE, """
        out(call(hp.VolumeCreate(id=0, name="big", source=hp.FromImage(image="minimal"),
                                 size_bytes=9 * 1024**3)))
        for i in range(4):
            out(call(hp.VolumeCreate(id=0, name=f"v{i}", source=hp.FromImage(image="minimal"))))
        out(call(hp.VolumeCreate(id=0, name="fifth", source=hp.FromImage(image="minimal"))))
        out(sorted(v.name for v in c.request(hp.VolumeList(id=0)).volumes))
        for i in range(4):
            c.request(hp.VolumeDestroy(id=0, name=f"v{i}"))
        out([v.name for v in c.request(hp.VolumeList(id=0)).volumes])
    """)
    assert res == [
        "limit_exceeded",
        "VolumeInfo", "VolumeInfo", "VolumeInfo", "VolumeInfo",
        "limit_exceeded",
        ["v0", "v1", "v2", "v3"],
        [],
    ]


def test_snapshot_clone_rollback_destroy_life_cycle(helper: HelperProcess) -> None:
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        c.request(hp.VolumeCreate(id=0, name="life", source=hp.FromImage(image="minimal")))
        with pytest.raises(AlreadyExists):
            c.request(hp.VolumeCreate(id=0, name="life", source=hp.FromImage(image="minimal")))
        c.request(hp.SnapshotCreate(id=0, volume="life", snapshot="s1"))
        c.request(hp.SnapshotCreate(id=0, volume="life", snapshot="s2"))
        with pytest.raises(AlreadyExists):
            c.request(hp.SnapshotCreate(id=0, volume="life", snapshot="s2"))
        clone = c.request(hp.VolumeCreate(
            id=0, name="fork", source=hp.FromSnapshot(volume="life", snapshot="s1")))
        assert isinstance(clone, hp.VolumeInfo) and clone.origin == "snapshot:life@s1"
        with pytest.raises(Conflict):  # the fork depends on s1
            c.request(hp.SnapshotDelete(id=0, volume="life", snapshot="s1"))
        back = c.request(hp.SnapshotRollback(id=0, volume="life", snapshot="s1"))
        assert isinstance(back, hp.VolumeInfo)
        assert [s.name for s in back.snapshots] == ["s1"]  # s2 discarded
        grown = c.request(hp.VolumeGrow(id=0, name="fork", size_bytes=2 * GiB))
        assert isinstance(grown, hp.VolumeInfo) and grown.size_bytes == 2 * GiB
        c.request(hp.VolumeDestroy(id=0, name="fork"))
        c.request(hp.SnapshotDelete(id=0, volume="life", snapshot="s1"))
        c.request(hp.VolumeDestroy(id=0, name="life"))
        with pytest.raises(NotFound):
            c.request(hp.VolumeGet(id=0, name="life"))
        left = c.request(hp.VolumeList(id=0))
        assert isinstance(left, hp.Volumes) and left.volumes == []
    # The registry on disk agrees.
    reg = json.loads((helper.workdir / "state" / "registry.json").read_text())
    assert reg["volumes"] == []



def test_a_listing_during_creates_and_destroys_never_fails(helper: HelperProcess) -> None:
    """VolumeList takes no lock: a volume registered while its disk is still
    being made (or already removed) is left out of the listing, not a
    ``not_found`` for the whole listing (an agent's workspace_list while
    another create runs)."""
    errors: list[str] = []
    seen: set[str] = set()
    done = threading.Event()

    def churn() -> None:
        try:
            with BlockingHelperClient(str(helper.socket), timeout=180) as c:
                for i in range(12):
                    c.request(hp.VolumeCreate(id=0, name=f"churn{i}",
                                              source=hp.FromImage(image="minimal")))
                    c.request(hp.VolumeDestroy(id=0, name=f"churn{i}"))
        finally:
            done.set()

    t = threading.Thread(target=churn)
    t.start()
    listings = 0
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        while not done.is_set():
            try:
                vols = c.request(hp.VolumeList(id=0))
            except RemoteError as exc:
                errors.append(f"{exc.code}: {exc}")
                continue
            assert isinstance(vols, hp.Volumes)
            seen.update(v.name for v in vols.volumes)
            listings += 1
    t.join(60)
    assert not errors, errors[:3]
    assert listings > 12 and seen, (listings, seen)  # it listed while they came and went
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        vols = c.request(hp.VolumeList(id=0))
    assert isinstance(vols, hp.Volumes) and not [v for v in vols.volumes
                                                 if v.name.startswith("churn")]
