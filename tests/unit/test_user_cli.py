"""``agentiso doctor``, ``status`` and ``list``: the pure parts (verdicts over
gathered facts, the join of catalog rows with the helper's resources)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agentiso.frontend.catalog_rows import WorkspaceRecord
from agentiso.frontend.doctor import Check, UserFacts, exit_code, judge, render, state_problem
from agentiso.frontend.lifecycle import State
from agentiso.frontend.status import (
    Snapshot,
    human_bytes,
    render_list,
    render_status,
    workspace_rows,
)
from agentiso.protocol import helper as hp

GOOD = UserFacts(
    uid=1000, user="alice", groups=(1000, 4242), config_source="/home/alice/.config/x.toml",
    state_dir="/home/alice/.local/state/agentiso", socket_path="/run/agentiso/helper.sock",
    socket_stat=(0o660, 0, 4242, True), socket_group="agentiso", listed_in_group=True,
    identity=(1000, 1000, False), helper_server="agentiso-helper 0.1",
    images=("minimal", "dev"), default_image="minimal",
)


def verdicts(f: UserFacts) -> dict[str, Check]:
    return {c.name: c for c in judge(f)}


def test_a_user_who_can_use_it_passes() -> None:
    checks = judge(GOOD)
    assert [c.name for c in checks] == ["config", "state-dir", "socket", "permission",
                                        "helper", "images"]
    assert all(c.status == "pass" for c in checks), render(checks)
    assert exit_code(checks) == 0 and render(checks).endswith("you can use agentiso")


@pytest.mark.parametrize("name, changes, skipped", [
    ("config", {"config_error": "x.toml: bad key\nFix that key."}, []),
    ("state-dir", {"state_problem": "/s: it is not writable by you"}, []),
    ("socket", {"socket_stat": None}, ["permission", "helper", "images"]),
    ("socket", {"socket_stat": (0o660, 0, 4242, False)}, ["permission", "helper", "images"]),
    ("socket", {"socket_dir_problem": "cannot enter /run/agentiso"},
     ["permission", "helper", "images"]),
    ("permission", {"groups": (1000,), "listed_in_group": False}, ["helper", "images"]),
    ("permission", {"groups": (1000,)}, ["helper", "images"]),
    ("permission", {"socket_stat": (0o600, 0, 4242, True)}, ["helper", "images"]),
    ("helper", {"connect_error": "connection refused", "identity": None}, ["images"]),
    ("helper", {"connect_error": "[permission_denied] not in group", "connect_denied": True,
                "identity": None}, ["images"]),
    ("images", {"images": ()}, []),
    ("images", {"images": None, "images_error": "timeout"}, []),
    ("images", {"default_image": "gpu"}, []),
])
def test_each_failure_says_why_and_what_to_do(
        name: str, changes: dict[str, object], skipped: list[str]) -> None:
    f = dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]
    v = verdicts(f)
    assert v[name].status == "fail" and v[name].fix, v[name]
    assert [n for n, c in v.items() if c.status == "skip"] == skipped
    assert [n for n, c in v.items() if c.status == "fail"] == [name]
    assert exit_code(judge(f)) == 1
    assert render(judge(f)).endswith(f"fix {name} first")


def test_permission_fixes_name_the_group_and_the_right_step() -> None:
    not_member = verdicts(dataclasses.replace(GOOD, groups=(1000,), listed_in_group=False))
    assert "usermod -aG agentiso alice" in not_member["permission"].fix
    stale_login = verdicts(dataclasses.replace(GOOD, groups=(1000,)))
    assert "log out and in" in stale_login["permission"].fix
    # Connecting needs write permission: the owner's, group's or others' bits decide.
    assert verdicts(dataclasses.replace(GOOD, groups=(1000,), socket_stat=(0o666, 0, 4242, True))
                    )["permission"].status == "pass"
    assert verdicts(dataclasses.replace(GOOD, uid=0, groups=(0,), socket_stat=(0o600, 0, 4242,
                                                                                True))
                    )["permission"].status == "pass"
    assert verdicts(dataclasses.replace(GOOD, socket_stat=(0o640, 0, 4242, True))
                    )["permission"].status == "fail"


def test_a_refusal_by_the_helper_names_the_group() -> None:
    f = dataclasses.replace(GOOD, connect_error="[permission_denied] x", connect_denied=True,
                            identity=None, socket_stat=(0o666, 0, 4242, True), groups=(1000,))
    v = verdicts(f)
    assert v["permission"].status == "pass" and v["helper"].status == "fail"
    assert "refused you" in v["helper"].detail and "usermod -aG agentiso alice" in v["helper"].fix


def test_state_problem(tmp_path: Path) -> None:
    assert state_problem(tmp_path / "a" / "b") is None  # creatable
    (tmp_path / "f").write_text("")
    assert "not a directory" in (state_problem(tmp_path / "f" / "x") or "")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not writable" in (state_problem(ro / "x") or "")


def _rec(name: str, wid: str, state: State = State.RUNNING, session: str | None = "s1"
         ) -> WorkspaceRecord:
    return WorkspaceRecord(
        id=wid, name=name, image="minimal", vcpus=1, memory_mb=256, disk_gb=None,
        allow_internet=False, state=state, vm=wid, volume=wid, created_at=0.0,
        updated_at=0.0, session=session,
    )


def _vm(name: str, state: str = "running", address: str = "10.42.0.2") -> hp.VmInfo:
    net = hp.VmNetworkInfo(address=address, prefix=16, gateway="10.42.0.1",
                           mac="52:54:00:00:00:02", policy=hp.NetworkPolicy())
    return hp.VmInfo(id=0, name=name, volume=name, state=state,  # type: ignore[arg-type]
                     vcpus=1, memory_mib=256, created=0.0, network=net)


def _vol(name: str, used: int = 5 << 20, snaps: int = 0) -> hp.VolumeInfo:
    return hp.VolumeInfo(
        id=0, name=name, size_bytes=1 << 30, used_bytes=used, created=0.0, origin="image:minimal",
        snapshots=[hp.SnapshotInfo(name=f"s{i}", created=0.0, used_bytes=0)
                   for i in range(snaps)])


def test_rows_join_catalog_and_helper_and_show_untracked() -> None:
    snap = Snapshot(
        records=[_rec("web", "ws-b"), _rec("db", "ws-a", State.STOPPED, session=None)],
        vms=[_vm("ws-b"), _vm("ws-lost", "crashed")],
        volumes=[_vol("ws-a", snaps=2), _vol("ws-b"), _vol("ws-orphan", used=0)],
    )
    rows, untracked = workspace_rows(snap)
    assert [r.name for r in rows] == ["db", "web"]
    db, web = rows
    assert (db.state, db.vm, db.address, db.snapshots, db.session) == (
        "stopped", "-", "-", 2, "")
    assert (web.state, web.vm, web.address, web.disk_used, web.session) == (
        "running", "running", "10.42.0.2", 5 << 20, "yours")
    assert untracked == ["VM ws-lost (crashed)", "volume ws-orphan (0 B used)"]
    table = render_list(rows, untracked)
    assert "web" in table and "10.42.0.2" in table and "5.0 MiB" in table
    assert "ws-orphan" in table and "reconciles" in table
    hello = hp.HelloOk(id=0, version=hp.HELPER_PROTOCOL_VERSION, server="agentiso-helper 0.1",
                       uptime_s=5)
    text = render_status(hello, hp.Identity(id=0, uid=1000, gid=1000, pid=1, admin=False),
                         "/s/catalog.db", rows, untracked)
    assert "reachable: agentiso-helper 0.1" in text
    assert "workspaces: 2, 1 running (256 MB of memory)" in text


def test_no_workspaces_and_sizes() -> None:
    assert render_list(*workspace_rows(Snapshot([], [], []))) == "no workspaces"
    assert [human_bytes(n) for n in (None, 0, 1023, 1024, 3 << 30)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "3.0 GiB"]
