"""The catalog: what only the user's side knows about workspaces, in SQLite.

The helper is the truth about resources (VMs, volumes); the catalog holds
names, shapes, states, env defaults, sessions and lineage.  One
file per user, ``catalog.db`` under the user's state dir, shared by every
``agentiso serve`` process of that user:

* WAL journal, so readers never block the one writer; ``busy_timeout`` so a
  writer waits for another instead of failing; ``synchronous=FULL`` so a
  committed row survives a power cut as well as a crash (writes are a handful
  per operation, so the fsync costs nothing next to a VM boot).
* Every write is one short ``BEGIN IMMEDIATE`` transaction: it takes the write
  lock up front, so a read-then-write (the state compare-and-set, the env
  merge) can never interleave with another process's and never hits a
  deadlock-style ``SQLITE_BUSY`` on upgrade.
* Unique names are a ``UNIQUE`` constraint, so two processes racing for one
  name cannot both win: the loser gets :class:`NameTaken`.
* The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` is
  the ordered list of steps, applied in one transaction on open.  A later
  feature (the snapshot tree) is one more function appended to the list.
* The directory is created 0700 and the file 0600 (SQLite gives its ``-wal``
  and ``-shm`` files the database file's mode).

A :class:`Catalog` may be used from several threads (calls are serialised on
one connection); each call is short, but a write may wait up to
:data:`BUSY_TIMEOUT_MS` for another process's write to finish.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .catalog_rows import (
    _ENV_KEY_RE,
    _WS_COLUMNS,
    BUSY_TIMEOUT_MS,
    CATALOG_FILE,
    MAX_ENV_KEYS,
    MAX_ENV_VALUE,
    MIGRATIONS,
    UPDATABLE,
    InvalidEnv,
    Migration,
    SessionRecord,
    SnapshotRecord,
    WorkspaceRecord,
    _check_env,
    _integrity_error_column,
    _session,
    _snapshot,
    _to_row,
    _workspace,
    is_workspace_id,
    validate_workspace_name,
)
from .lifecycle import State
from .workspace_errors import (
    CatalogError,
    NameTaken,
    SessionNotFound,
    SnapshotExists,
    SnapshotQuota,
    StateConflict,
    WorkspaceNotFound,
)

__all__ = [
    "BUSY_TIMEOUT_MS", "CATALOG_FILE", "MAX_ENV_KEYS", "MAX_ENV_VALUE", "MIGRATIONS",
    "Catalog", "InvalidEnv", "Migration", "SessionRecord", "SnapshotRecord", "WorkspaceRecord",
    "is_workspace_id", "validate_workspace_name",
]

# --- the catalog -----------------------------------------------------------------------


class Catalog:
    """The user's catalog database.  Open with :meth:`open`; close or use ``with``."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, migrations: Sequence[Migration] = MIGRATIONS) -> Catalog:
        """Open (creating and migrating as needed) the catalog at ``path``.

        Raises :class:`CatalogError` if the file cannot be opened, is not a
        database, or has a schema newer than this code knows.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created here, 0600, so SQLite never creates it with the umask's
            # mode; an existing one is tightened (its -wal and -shm follow it).
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CatalogError(
                f"cannot create the catalog {path}: {exc.strerror or exc}",
                "Check that the state directory is writable by you (or set state_dir"
                " in config.toml).",
            ) from None
        try:
            db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _db_error(path, exc) from None
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _wal(db)
            if mode != "wal":
                raise CatalogError(
                    f"the catalog {path} cannot use a WAL journal (got {mode!r})",
                    "Keep the state directory on a local file system.",
                )
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            _migrate(db, path, migrations)
        except sqlite3.Error as exc:
            db.close()
            raise _db_error(path, exc) from None
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, committed on success, rolled back otherwise."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc) from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # e.g. already rolled back by SQLite itself
                if isinstance(exc, sqlite3.IntegrityError):
                    raise  # mapped to a typed error by the caller
                if isinstance(exc, sqlite3.Error):
                    raise _db_error(self.path, exc) from None
                raise

    @staticmethod
    def _select_ws(db: sqlite3.Connection, where: str, *args: object) -> WorkspaceRecord | None:
        row = db.execute(f"SELECT * FROM workspaces WHERE {where}", args).fetchone()
        return None if row is None else _workspace(row)

    # --- workspaces --------------------------------------------------------------------

    def new_workspace_id(self) -> str:
        """A fresh id, ``ws-`` + 10 hex digits, not used by any row."""
        while True:
            wid = "ws-" + secrets.token_hex(5)
            if self.find_workspace(wid) is None:
                return wid

    def add_workspace(
        self, rec: WorkspaceRecord, *,
        check: Callable[[list[WorkspaceRecord]], None] | None = None,
    ) -> WorkspaceRecord:
        """Insert ``rec``; :class:`NameTaken` if its name is in use (atomic across processes).

        ``check`` sees every row inside the same write transaction and may
        raise to refuse the insert: quotas are checked this way, so two
        frontends cannot both squeeze under one limit."""
        validate_workspace_name(rec.name)
        if not is_workspace_id(rec.id):
            raise ValueError(f"not a workspace id: {rec.id!r}")
        _check_env(rec.env)
        cols = ", ".join(_WS_COLUMNS)
        marks = ", ".join("?" for _ in _WS_COLUMNS)
        values = [_to_row(c, getattr(rec, c)) for c in _WS_COLUMNS]
        try:
            with self._write() as db:
                if check is not None:
                    rows = db.execute("SELECT * FROM workspaces ORDER BY created_at, id")
                    check([_workspace(r) for r in rows.fetchall()])
                db.execute(f"INSERT INTO workspaces ({cols}) VALUES ({marks})", values)
        except sqlite3.IntegrityError as exc:
            if _integrity_error_column(exc) == "name":
                raise NameTaken(rec.name) from None
            if _integrity_error_column(exc) == "id":
                raise CatalogError(
                    f"workspace id {rec.id} is already in the catalog",
                    "Make the id with new_workspace_id().",
                ) from None
            raise _db_error(self.path, exc) from None
        return rec

    def find_workspace(self, ref: str) -> WorkspaceRecord | None:
        """The workspace whose id or name is ``ref``, or None."""
        with self._read() as db:
            # Names never look like ids (validate_workspace_name), so at most one matches.
            return self._select_ws(db, "id = ? OR name = ?", ref, ref)

    def get_workspace(self, ref: str) -> WorkspaceRecord:
        """The workspace whose id or name is ``ref``; :class:`WorkspaceNotFound` if none."""
        rec = self.find_workspace(ref)
        if rec is None:
            raise WorkspaceNotFound(ref)
        return rec

    def list_workspaces(self, *, session: str | None = None) -> list[WorkspaceRecord]:
        """Every workspace (or only ``session``'s), oldest first."""
        with self._read() as db:
            if session is None:
                rows = db.execute("SELECT * FROM workspaces ORDER BY created_at, id")
            else:
                rows = db.execute(
                    "SELECT * FROM workspaces WHERE session = ? ORDER BY created_at, id",
                    (session,),
                )
            return [_workspace(r) for r in rows.fetchall()]

    def update_workspace(self, id: str, /, **changes: Any) -> WorkspaceRecord:
        """Change some columns of workspace ``id`` and return the new row.

        Only the fields of :class:`WorkspaceRecord` except ``id``,
        ``created_at`` and ``updated_at`` (set to now) may change; another name
        is a ``TypeError``.  A new name is validated (:class:`InvalidName`,
        :class:`NameTaken`).  Raises :class:`WorkspaceNotFound`.
        """
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise TypeError(f"update_workspace: cannot change {sorted(unknown)}")
        if "name" in changes:
            validate_workspace_name(changes["name"])
        if "env" in changes:
            _check_env(changes["env"])
        fields = sorted(changes)
        assignments = ", ".join(f"{c} = ?" for c in [*fields, "updated_at"])
        values = [_to_row(c, changes[c]) for c in fields]
        try:
            with self._write() as db:
                cur = db.execute(
                    f"UPDATE workspaces SET {assignments} WHERE id = ?",
                    [*values, time.time(), id],
                )
                if cur.rowcount == 0:
                    raise WorkspaceNotFound(id)
                rec = self._select_ws(db, "id = ?", id)
        except sqlite3.IntegrityError as exc:
            if _integrity_error_column(exc) == "name":
                raise NameTaken(str(changes["name"])) from None
            raise _db_error(self.path, exc) from None
        assert rec is not None
        return rec

    def set_state(
        self,
        id: str,
        new: State,
        reason: str = "",
        *,
        expect: Collection[State] | None = None,
    ) -> WorkspaceRecord:
        """Set the state of workspace ``id``: a compare-and-set in one transaction.

        With ``expect``, the current state must be one of it, or
        :class:`StateConflict` (naming the current state) is raised and
        nothing changes.  This is how two frontends avoid starting or
        destroying one workspace at once: each claims it by moving it to a
        busy state from the states the operation allows, and only one can.
        Raises :class:`WorkspaceNotFound`.
        """
        new = State(new)
        with self._write() as db:
            row = db.execute("SELECT name, state FROM workspaces WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise WorkspaceNotFound(id)
            if expect is not None and row["state"] not in {str(s) for s in expect}:
                raise StateConflict(row["name"], row["state"], sorted(str(s) for s in expect))
            db.execute(
                "UPDATE workspaces SET state = ?, state_reason = ?, updated_at = ? WHERE id = ?",
                (str(new), reason, time.time(), id),
            )
            rec = self._select_ws(db, "id = ?", id)
        assert rec is not None
        return rec

    def adopt(
        self, id: str, session: str, *, unless_alive: Callable[[str], bool] | None = None
    ) -> WorkspaceRecord | None:
        """Make ``session`` the owner of workspace ``id`` (one transaction).

        With ``unless_alive``, a workspace whose owning session it reports
        alive is left alone and None is returned.  Raises :class:`WorkspaceNotFound`.
        """
        with self._write() as db:
            rec = self._select_ws(db, "id = ?", id)
            if rec is None:
                raise WorkspaceNotFound(id)
            if rec.session == session:
                return rec
            if unless_alive is not None and rec.session and unless_alive(rec.session):
                return None
            db.execute("UPDATE workspaces SET session = ?, updated_at = ? WHERE id = ?",
                       (session, time.time(), id))
            return self._select_ws(db, "id = ?", id)

    # --- snapshots ---------------------------------------------------------------------

    def add_snapshot(self, snap: SnapshotRecord, *, max_count: int | None = None) -> None:
        """Record a snapshot and make it the workspace's head (one transaction).
        ``max_count``: refuse (SnapshotQuota) when the workspace has that many."""
        with self._write() as db:
            n = db.execute("SELECT count(*) FROM snapshots WHERE workspace = ?",
                           (snap.workspace,)).fetchone()[0]
            if max_count is not None and n >= max_count:
                raise SnapshotQuota(n, max_count)
            try:
                db.execute(
                    "INSERT INTO snapshots (workspace, name, volume, helper_name, parent,"
                    " description, memory, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (snap.workspace, snap.name, snap.volume, snap.helper_name, snap.parent,
                     snap.description, int(snap.memory), snap.created_at),
                )
            except sqlite3.IntegrityError:
                raise SnapshotExists(snap.name) from None
            db.execute("UPDATE workspaces SET head = ?, updated_at = ? WHERE id = ?",
                       (snap.name, time.time(), snap.workspace))

    def list_snapshots(self, workspace: str) -> list[SnapshotRecord]:
        """A workspace's snapshots, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM snapshots WHERE workspace = ? ORDER BY created_at",
                              (workspace,)).fetchall()
        return [_snapshot(r) for r in rows]

    def delete_snapshot(self, workspace: str, name: str) -> None:
        """Remove a node; its children hang from its parent, and a head on it
        moves to its parent."""
        with self._write() as db:
            row = db.execute("SELECT parent FROM snapshots WHERE workspace = ? AND name = ?",
                             (workspace, name)).fetchone()
            if row is None:
                return
            db.execute("UPDATE snapshots SET parent = ? WHERE workspace = ? AND parent = ?",
                       (row["parent"], workspace, name))
            db.execute("UPDATE workspaces SET head = ? WHERE id = ? AND head = ?",
                       (row["parent"], workspace, name))
            db.execute("DELETE FROM snapshots WHERE workspace = ? AND name = ?",
                       (workspace, name))

    def delete_workspace(self, id: str) -> bool:
        """Delete workspace ``id``'s row; False if there was none (so undo may repeat it)."""
        with self._write() as db:
            return db.execute("DELETE FROM workspaces WHERE id = ?", (id,)).rowcount > 0

    def set_env(
        self, id: str, set: Mapping[str, str], unset: Collection[str] = ()
    ) -> dict[str, str]:
        """Merge env defaults atomically: remove ``unset``, then add ``set``; the result.

        Raises :class:`InvalidEnv` (nothing changes) and :class:`WorkspaceNotFound`.
        """
        _check_env(set)
        for key in unset:
            if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
                raise InvalidEnv(f"bad variable name {str(key)[:100]!r}")
        with self._write() as db:
            row = db.execute("SELECT env FROM workspaces WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise WorkspaceNotFound(id)
            env: dict[str, str] = json.loads(row["env"])
            for key in unset:
                env.pop(key, None)
            env.update(set)
            _check_env(env)
            db.execute(
                "UPDATE workspaces SET env = ?, updated_at = ? WHERE id = ?",
                (_to_row("env", env), time.time(), id),
            )
        return env

    # --- golden workspaces (workspace_prepare) -----------------------------------------

    def get_golden(self, workspace: str) -> dict[str, Any] | None:
        """The golden record of workspace id ``workspace``: ``args`` (a dict),
        ``state`` ('preparing' or 'ready'), ``commit_id``, ``updated_at``."""
        with self._read() as db:
            row = db.execute("SELECT * FROM golden WHERE workspace = ?", (workspace,)).fetchone()
        if row is None:
            return None
        return {"args": json.loads(row["args"]), "state": row["state"],
                "commit_id": row["commit_id"], "updated_at": row["updated_at"]}

    def set_golden(self, workspace: str, args: Mapping[str, Any], state: str,
                   commit_id: str | None = None) -> None:
        """Record (or replace) workspace ``workspace``'s golden record."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO golden (workspace, args, state, commit_id, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (workspace, json.dumps(dict(args), sort_keys=True), state, commit_id,
                 time.time()),
            )

    # --- sessions ----------------------------------------------------------------------

    def add_session(self, id: str, pid: int, client: str = "") -> SessionRecord:
        rec = SessionRecord(id=id, pid=pid, client=client, started_at=time.time())
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO sessions (id, pid, client, started_at) VALUES (?, ?, ?, ?)",
                    (rec.id, rec.pid, rec.client, rec.started_at),
                )
        except sqlite3.IntegrityError:
            raise CatalogError(
                f"session {id!r} is already in the catalog", "Make a new session id."
            ) from None
        return rec

    def end_session(self, id: str) -> SessionRecord:
        """Mark session ``id`` ended (now, unless it already was); :class:`SessionNotFound`."""
        with self._write() as db:
            db.execute(
                "UPDATE sessions SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
                (time.time(), id),
            )
            row = db.execute("SELECT * FROM sessions WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise SessionNotFound(id)
        return _session(row)

    def prune_sessions(self, alive: Callable[[str], bool], keep_s: float = 7 * 86400) -> int:
        """Close the sessions whose process is gone (killed without a word), and
        forget ended ones older than ``keep_s`` that own no workspace.  Returns
        how many rows were removed."""
        with self._read() as db:
            open_ids = [r[0] for r in db.execute(
                "SELECT id FROM sessions WHERE ended_at IS NULL").fetchall()]
        for sid in open_ids:
            if not alive(sid):
                self.end_session(sid)
        with self._write() as db:
            return db.execute(
                "DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ? AND id NOT IN"
                " (SELECT session FROM workspaces WHERE session IS NOT NULL)",
                (time.time() - keep_s,),
            ).rowcount

    def get_session(self, id: str) -> SessionRecord:
        with self._read() as db:
            row = db.execute("SELECT * FROM sessions WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise SessionNotFound(id)
        return _session(row)

    def list_sessions(self) -> list[SessionRecord]:
        """Every session, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM sessions ORDER BY started_at, id").fetchall()
        return [_session(r) for r in rows]


# --- helpers ---------------------------------------------------------------------------


def _migrate(db: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    """Bring the schema to ``len(migrations)`` in one transaction (a no-op when current)."""
    target = len(migrations)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == target:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > target:
            raise CatalogError(
                f"the catalog {path} has schema version {version}, newer than this"
                f" agentiso knows ({target})",
                "Upgrade agentiso (every agentiso serve of a user must be the same version).",
            )
        for step in migrations[version:]:
            step(db)
        db.execute(f"PRAGMA user_version = {target:d}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _wal(db: sqlite3.Connection) -> str:
    """Put the database in WAL mode; the journal mode it ends in.

    Switching the mode needs the database to itself for a moment, and SQLite
    answers "locked" at once (without its busy handler) while another process
    holds it, e.g. when several frontends open a new catalog together: so
    the switch is retried for as long as the busy timeout allows, and skipped
    when the file is already in WAL mode."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = str(db.execute("PRAGMA journal_mode").fetchone()[0])
            if mode != "wal":
                mode = str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            return mode
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _db_error(path: Path, exc: sqlite3.Error) -> CatalogError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return CatalogError(
            f"the catalog {path} stayed locked by another agentiso process for"
            f" {BUSY_TIMEOUT_MS // 1000} s",
            "Retry; if it persists, look for a hung agentiso serve of yours.",
        )
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return CatalogError(
            f"the catalog {path} is not an SQLite database",
            "Move it aside: agentiso then starts a new, empty catalog.",
        )
    return CatalogError(
        f"the catalog {path} failed: {text}",
        "Retry; if it persists, check the file with sqlite3 (PRAGMA integrity_check).",
    )
