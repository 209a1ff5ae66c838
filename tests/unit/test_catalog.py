"""The catalog: round trips, unique names, compare-and-set, env merge, schema
migrations, file modes, and several OS processes sharing one database."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.frontend.catalog import (
    MIGRATIONS,
    Catalog,
    InvalidEnv,
    WorkspaceRecord,
    is_workspace_id,
    validate_workspace_name,
)
from agentiso.frontend.errors import FrontendError
from agentiso.frontend.lifecycle import State
from agentiso.frontend.workspace_errors import (
    CatalogError,
    InvalidName,
    NameTaken,
    SessionNotFound,
    StateConflict,
    WorkspaceNotFound,
)


def make(cat: Catalog, name: str, **kw: object) -> WorkspaceRecord:
    wid = cat.new_workspace_id()
    now = time.time()
    fields: dict[str, object] = dict(
        id=wid, name=name, image="minimal", vcpus=1, memory_mb=256, disk_gb=None,
        allow_internet=False, state=State.CREATING, vm=wid, volume=wid,
        created_at=now, updated_at=now,
    )  # fmt: skip
    fields.update(kw)
    return WorkspaceRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog.open(tmp_path / "state" / "catalog.db") as c:
        yield c


# --- names and ids -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "my-ws", "a" * 63, "ws-1", "ws-0123456789a", "x-"])
def test_valid_names(name: str) -> None:
    assert validate_workspace_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", "A", "My", "a_b", "a.b", "a b", "a" * 64, "ws-0123456789", "ws-abcdefabcd",
     "é", "a\n", "a\0", "../x", 3, None],
)  # fmt: skip
def test_invalid_names_say_the_rule(name: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_workspace_name(name)
    msg = str(info.value)
    assert "lowercase letters, digits and '-'" in msg and "ws-<10 hex digits>" in msg
    assert isinstance(info.value, FrontendError)


def test_new_ids(cat: Catalog) -> None:
    ids = {cat.new_workspace_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_workspace_id(i) and len(i) == 13 for i in ids)


# --- round trips ---------------------------------------------------------------------------


def test_workspace_round_trip(cat: Catalog) -> None:
    rec = make(
        cat, "alpha", disk_gb=8, allow_internet=True, state_reason="why", session="s-1",
        env={"A": "1", "B": "x y"}, parent_workspace="ws-0000000000", parent_snapshot="snap1",
    )  # fmt: skip
    assert cat.add_workspace(rec) == rec
    for ref in (rec.id, "alpha"):
        got = cat.get_workspace(ref)
        assert got == rec
        assert type(got.state) is State and got.allow_internet is True
    assert cat.find_workspace("nope") is None
    assert cat.list_workspaces() == [rec]


def test_not_found_says_how_to_list(cat: Catalog) -> None:
    with pytest.raises(WorkspaceNotFound, match="workspace_list") as info:
        cat.get_workspace("ghost")
    assert (
        str(info.value)
        == "no workspace named or with id 'ghost'\nList your workspaces with workspace_list."
    )
    for call in (
        lambda: cat.update_workspace("ws-0000000000", image="x"),
        lambda: cat.set_state("ws-0000000000", State.RUNNING),
        lambda: cat.set_env("ws-0000000000", {"A": "1"}),
    ):
        with pytest.raises(WorkspaceNotFound):
            call()


def test_list_is_ordered_by_creation_and_filters_by_session(cat: Catalog) -> None:
    recs = [make(cat, f"w{i}", created_at=1000.0 - i, session="s-a" if i % 2 else "s-b")
            for i in range(5)]  # fmt: skip
    for r in recs:
        cat.add_workspace(r)
    assert [r.name for r in cat.list_workspaces()] == ["w4", "w3", "w2", "w1", "w0"]
    assert [r.name for r in cat.list_workspaces(session="s-a")] == ["w3", "w1"]


def test_unique_names(cat: Catalog) -> None:
    cat.add_workspace(make(cat, "dup"))
    with pytest.raises(NameTaken, match="'dup' already exists") as info:
        cat.add_workspace(make(cat, "dup"))
    assert info.value.name == "dup"
    assert len(cat.list_workspaces()) == 1


def test_add_validates(cat: Catalog) -> None:
    with pytest.raises(InvalidName):
        cat.add_workspace(make(cat, "Bad"))
    with pytest.raises(ValueError, match="not a workspace id"):
        cat.add_workspace(make(cat, "ok", id="nope"))
    with pytest.raises(InvalidEnv):
        cat.add_workspace(make(cat, "ok", env={"1BAD": "x"}))
    rec = cat.add_workspace(make(cat, "ok"))
    with pytest.raises(CatalogError, match="already in the catalog"):
        cat.add_workspace(make(cat, "other", id=rec.id))
    assert [r.name for r in cat.list_workspaces()] == ["ok"]


def test_update_workspace(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "u", updated_at=1.0))
    cat.add_workspace(make(cat, "taken"))
    new = cat.update_workspace(rec.id, name="u2", vcpus=2, disk_gb=4, allow_internet=True,
                               session=None, state=State.STOPPED)  # fmt: skip
    assert (new.name, new.vcpus, new.disk_gb, new.allow_internet, new.state) == (
        "u2", 2, 4, True, State.STOPPED,
    )  # fmt: skip
    assert new.updated_at > 1.0 and new.created_at == rec.created_at
    assert cat.get_workspace("u2") == new
    with pytest.raises(NameTaken):
        cat.update_workspace(rec.id, name="taken")
    with pytest.raises(InvalidName):
        cat.update_workspace(rec.id, name="ws-0123456789")
    for bad in ("id", "created_at", "updated_at", "color"):
        with pytest.raises(TypeError, match="cannot change"):
            cat.update_workspace(rec.id, **{bad: "x"})
    assert cat.get_workspace(rec.id) == new


def test_delete_is_idempotent(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "d"))
    assert cat.delete_workspace(rec.id) is True
    assert cat.delete_workspace(rec.id) is False
    assert cat.find_workspace("d") is None
    # The name is free again.
    cat.add_workspace(make(cat, "d"))


# --- state compare-and-set -----------------------------------------------------------------


def test_set_state_and_cas(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "s"))
    r = cat.set_state(rec.id, State.RUNNING, expect=[State.CREATING])
    assert (r.state, r.state_reason) == (State.RUNNING, "")
    r = cat.set_state(rec.id, State.CRASHED, "qemu died")
    assert (r.state, r.state_reason) == (State.CRASHED, "qemu died")
    with pytest.raises(StateConflict) as info:
        cat.set_state(rec.id, State.STARTING, expect={State.STOPPED, State.RUNNING})
    err = info.value
    assert err.current == "crashed" and err.workspace == "s"
    assert str(err).startswith("workspace 's' is crashed, not running or stopped")
    assert cat.get_workspace(rec.id).state is State.CRASHED  # unchanged
    # An empty expectation never matches.
    with pytest.raises(StateConflict):
        cat.set_state(rec.id, State.STOPPED, expect=())
    # Without expect it is unconditional.
    assert cat.set_state(rec.id, State.STOPPED).state is State.STOPPED


def test_cas_between_two_connections(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with Catalog.open(path) as a, Catalog.open(path) as b:
        rec = a.add_workspace(make(a, "w", state=State.STOPPED))
        a.set_state(rec.id, State.STARTING, expect=[State.STOPPED, State.CRASHED])
        with pytest.raises(StateConflict, match="is starting"):
            b.set_state(rec.id, State.DESTROYING, expect=[State.STOPPED, State.CRASHED])


# --- env -----------------------------------------------------------------------------------


def test_env_merge(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "e", env={"A": "1", "B": "2"}))
    assert cat.set_env(rec.id, {"B": "two", "C": "3"}, ["A", "NOT_THERE"]) == {"B": "two", "C": "3"}
    assert cat.get_workspace(rec.id).env == {"B": "two", "C": "3"}
    # unset first, then set: a key in both ends up set.
    assert cat.set_env(rec.id, {"B": "b"}, ["B"]) == {"B": "b", "C": "3"}
    assert cat.set_env(rec.id, {}, []) == {"B": "b", "C": "3"}


@pytest.mark.parametrize(
    ("set_", "unset"),
    [({"1A": "x"}, []), ({"A=B": "x"}, []), ({"": "x"}, []), ({"A": "x\0y"}, []),
     ({"A": "x" * (32 * 1024 + 1)}, []), ({}, ["BAD-KEY"]), ({"A": 1}, [])],
)  # fmt: skip
def test_env_refuses_bad_input_and_changes_nothing(
    cat: Catalog, set_: dict[str, str], unset: list[str]
) -> None:
    rec = cat.add_workspace(make(cat, "e", env={"KEEP": "1"}))
    with pytest.raises(InvalidEnv):
        cat.set_env(rec.id, set_, unset)
    assert cat.get_workspace(rec.id).env == {"KEEP": "1"}


def test_env_bound_on_the_merged_result(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "e", env={f"K{i}": "" for i in range(1000)}))
    with pytest.raises(InvalidEnv, match="1025 variables"):
        cat.set_env(rec.id, {f"N{i}": "" for i in range(25)})
    assert len(cat.get_workspace(rec.id).env) == 1000


# --- sessions ------------------------------------------------------------------------------


def test_sessions(cat: Catalog) -> None:
    s = cat.add_session("s-1", 123, "claude-code")
    assert (s.id, s.pid, s.client, s.ended_at) == ("s-1", 123, "claude-code", None)
    cat.add_session("s-2", 456, "")
    assert cat.get_session("s-1") == s
    with pytest.raises(CatalogError, match="already in the catalog"):
        cat.add_session("s-1", 1, "")
    ended = cat.end_session("s-1")
    assert ended.ended_at is not None and ended.ended_at >= s.started_at
    assert cat.end_session("s-1") == ended  # ending twice keeps the first time
    assert [x.id for x in cat.list_sessions()] == ["s-1", "s-2"]
    with pytest.raises(SessionNotFound):
        cat.get_session("s-none")
    with pytest.raises(SessionNotFound):
        cat.end_session("s-none")


def test_adopt_leaves_a_live_sessions_workspace_alone(cat: Catalog) -> None:
    """What workspace_adopt_all relies on: a workspace whose owner the
    liveness check reports alive is neither taken nor touched."""
    rec = cat.add_workspace(make(cat, "theirs", session="s-live", state=State.RUNNING))
    asked: list[str] = []

    def alive(s: str) -> bool:
        asked.append(s)
        return True

    assert cat.adopt(rec.id, "s-me", unless_alive=alive) is None
    assert asked == ["s-live"]
    assert cat.get_workspace(rec.id) == rec  # owner and updated_at unchanged
    # Its owner gone, the same call takes it; without the check, it is taken anyway.
    got = cat.adopt(rec.id, "s-me", unless_alive=lambda s: False)
    assert got is not None and got.session == "s-me"
    assert cat.adopt(rec.id, "s-other") is not None
    assert cat.get_workspace(rec.id).session == "s-other"
    # Its own session's workspace is returned as it is, never asked about.
    assert cat.adopt(rec.id, "s-other", unless_alive=alive) == cat.get_workspace(rec.id)
    assert asked == ["s-live"]
    with pytest.raises(WorkspaceNotFound):
        cat.adopt("ws-0000000000", "s-me", unless_alive=alive)


# --- files, schema, migrations ----------------------------------------------------------


def test_file_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "state" / "agentiso" / "catalog.db"
        with Catalog.open(path) as c:
            c.add_workspace(make(c, "m"))
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        os.umask(old)


def test_an_existing_catalog_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    with Catalog.open(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_pragmas(cat: Catalog) -> None:
    db = sqlite3.connect(cat.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        db.close()
    # Per-connection settings, on the catalog's own connection.
    conn = cat._db
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_migrations_from_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.touch()
    with Catalog.open(path) as c:
        c.add_workspace(make(c, "a"))

    # A later version appends a step; opening applies only the new one, once.
    ran: list[int] = []

    def next_step(db: sqlite3.Connection) -> None:
        ran.append(2)
        db.execute(
            "CREATE TABLE future (id TEXT PRIMARY KEY, workspace TEXT NOT NULL"
            " REFERENCES workspaces (id) ON DELETE CASCADE) STRICT"
        )

    steps = [*MIGRATIONS, next_step]
    newer = len(steps)
    with Catalog.open(path, migrations=steps) as c:
        assert [r.name for r in c.list_workspaces()] == ["a"]
    with Catalog.open(path, migrations=steps) as c:
        pass
    assert ran == [2]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == newer
    db.close()

    # The older code refuses the newer schema instead of misreading it.
    with pytest.raises(CatalogError, match=f"schema version {newer}, newer than this agentiso"):
        Catalog.open(path)


def test_failed_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.db"

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Catalog.open(path, migrations=[*MIGRATIONS, broken])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    db.close()
    with Catalog.open(path) as c:
        assert c.list_workspaces() == []


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="not an SQLite database\nMove it aside"):
        Catalog.open(path)


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CatalogError, match="cannot create the catalog"):
        Catalog.open(blocker / "catalog.db")


def test_a_row_this_version_cannot_read(cat: Catalog) -> None:
    rec = cat.add_workspace(make(cat, "r"))
    db = sqlite3.connect(cat.path)
    db.execute("UPDATE workspaces SET state = 'hibernating' WHERE id = ?", (rec.id,))
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="unreadable"):
        cat.get_workspace("r")


def test_records_are_frozen(cat: Catalog) -> None:
    rec = make(cat, "f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.name = "g"  # type: ignore[misc]


# --- several processes -----------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from agentiso.frontend.catalog import Catalog, WorkspaceRecord
    from agentiso.frontend.lifecycle import State
    from agentiso.frontend.workspace_errors import NameTaken, StateConflict

    path, me, n, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    out = {"added": [], "won_names": [], "won_cas": [], "lists": 0}
    with Catalog.open(path) as cat:
        contested = [r.id for r in cat.list_workspaces() if r.name.startswith("cas-")]
        while not go.exists():
            time.sleep(0.005)
        for i in range(n):
            for name, key in ((f"p{me}-{i}", "added"), (f"shared-{i}", "won_names")):
                wid = cat.new_workspace_id()
                now = time.time()
                rec = WorkspaceRecord(
                    id=wid, name=name, image="minimal", vcpus=1, memory_mb=256,
                    disk_gb=None, allow_internet=False, state=State.CREATING,
                    vm=wid, volume=wid, created_at=now, updated_at=now,
                )
                try:
                    cat.add_workspace(rec)
                    out[key].append(name)
                except NameTaken:
                    pass
            cat.set_env(contested[0], {f"W{me}_{i}": str(i)}, [])
            if i < len(contested):
                try:
                    cat.set_state(contested[i], State.STARTING, expect=[State.STOPPED])
                    out["won_cas"].append(contested[i])
                except StateConflict:
                    pass
            if i % 5 == 0:
                names = [r.name for r in cat.list_workspaces()]
                assert len(names) == len(set(names)), "duplicate names listed"
                out["lists"] += 1
    print(json.dumps(out))
    """
)


def test_several_processes_share_one_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    workers, n, contested = 4, 60, 20
    with Catalog.open(path) as cat:
        for i in range(contested):
            cat.add_workspace(make(cat, f"cas-{i}", state=State.STOPPED))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(k), str(n), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(workers)
    ]
    time.sleep(0.3)  # let them all open the catalog, then start at once
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))

    with Catalog.open(path) as cat:
        rows = cat.list_workspaces()
        names = [r.name for r in rows]
        assert len(names) == len(set(names))
        # No lost rows: every add a worker saw succeed is there, nothing else.
        own = {name for res in results for name in res["added"]}
        assert len(own) == workers * n
        won = [name for res in results for name in res["won_names"]]
        assert sorted(won) == sorted(f"shared-{i}" for i in range(n))  # each won exactly once
        assert set(names) == own | set(won) | {f"cas-{i}" for i in range(contested)}
        # Each contested compare-and-set was won by exactly one process.
        cas = [wid for res in results for wid in res["won_cas"]]
        assert len(cas) == len(set(cas)) == contested
        assert all(r.state is State.STARTING for r in rows if r.name.startswith("cas-"))
        # No lost env update.
        env = cat.get_workspace("cas-0").env
        assert env == {f"W{k}_{i}": str(i) for k in range(workers) for i in range(n)}
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        db.close()


OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agentiso.frontend.catalog import Catalog

    path, go = Path(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.002)
    with Catalog.open(path) as cat:
        print(len(cat.list_workspaces()))
    """
)


def test_several_processes_create_and_migrate_one_new_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "catalog.db"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.3)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "0"
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
