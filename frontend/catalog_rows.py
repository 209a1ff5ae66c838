"""The catalog's rows: records, validation, the schema and its migrations.

Pure (no connection is opened here): :mod:`.catalog` runs these against the
user's database.  A schema change is one more function appended to
:data:`MIGRATIONS`, never an edit of one that ran on a user's file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .lifecycle import State
from .workspace_errors import CatalogError, InvalidName, WorkspaceError

#: How long a write waits for another process's write before giving up.
BUSY_TIMEOUT_MS = 10_000
CATALOG_FILE = "catalog.db"

NAME_RULE = (
    "1 to 63 characters: lowercase letters, digits and '-', starting with a letter or digit,"
    " and not of the form ws-<10 hex digits> (that is a workspace id)"
)
_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")
_ID_RE = re.compile(r"\Aws-[0-9a-f]{10}\Z")

# Env defaults, bounded like the guest protocol's (agentiso.protocol.guest.Env).
_ENV_KEY_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_KEYS = 1024


class InvalidEnv(WorkspaceError):
    def __init__(self, what: str) -> None:
        super().__init__(
            f"invalid env: {what}",
            f"Use names like [A-Za-z_][A-Za-z0-9_]*, values without NUL of at most"
            f" {MAX_ENV_VALUE} bytes, and at most {MAX_ENV_KEYS} variables.",
        )


def validate_workspace_name(name: object) -> str:
    """``name`` if it is a valid workspace name, else :class:`InvalidName` saying the rule."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or _ID_RE.match(name):
        raise InvalidName(str(name)[:100], NAME_RULE)
    return name


def is_workspace_id(ref: str) -> bool:
    return bool(_ID_RE.match(ref))


# --- records ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorkspaceRecord:
    """One workspace row.  ``vm`` and ``volume`` are the helper's resource names."""

    id: str
    name: str
    image: str
    vcpus: int
    memory_mb: int
    #: None: the image's own disk size.
    disk_gb: int | None
    allow_internet: bool
    state: State
    vm: str
    volume: str
    created_at: float
    updated_at: float
    state_reason: str = ""
    #: The owning session's id (None: unowned, e.g. its session ended).
    session: str | None = None
    #: Default environment of later execs.
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Fork lineage: the workspace and snapshot this one was made from.
    parent_workspace: str | None = None
    parent_snapshot: str | None = None
    #: The network settings beyond ``allow_internet`` (allow-list, peers,
    #: groups, port forwards), as the network tools keep them.
    network: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The snapshot the current state descends from (None: none taken yet).
    head: str | None = None
    #: When the helper ends it by itself: ``idle_s``, ``lifetime_s``, ``action``.
    time_limits: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SnapshotRecord:
    """One node of a workspace's snapshot tree.  ``volume`` is the helper
    volume that holds it (a restore to an older node moves the workspace to a
    clone, so the nodes after it stay restorable), ``helper_name`` its name
    there."""

    workspace: str
    name: str
    volume: str
    helper_name: str
    parent: str | None
    description: str
    memory: bool
    created_at: float


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    id: str
    pid: int
    client: str
    started_at: float
    ended_at: float | None = None


# --- schema ----------------------------------------------------------------------------


def _v1_workspaces_and_sessions(db: sqlite3.Connection) -> None:
    # No CHECK on `state`: the set of states may grow, and changing a CHECK in
    # SQLite means rebuilding the table; rows are checked when read instead.
    # `session` is not a foreign key: a workspace outlives its session (it is
    # adopted later), and sessions may be recorded after the workspaces they own.
    # `parent_workspace` is not one either: a fork outlives its parent.
    db.execute(
        """
        CREATE TABLE workspaces (
            id               TEXT PRIMARY KEY,
            name             TEXT NOT NULL UNIQUE,
            image            TEXT NOT NULL,
            vcpus            INTEGER NOT NULL,
            memory_mb        INTEGER NOT NULL,
            disk_gb          INTEGER,
            allow_internet   INTEGER NOT NULL CHECK (allow_internet IN (0, 1)),
            state            TEXT NOT NULL,
            state_reason     TEXT NOT NULL DEFAULT '',
            vm               TEXT NOT NULL,
            volume           TEXT NOT NULL,
            session          TEXT,
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL,
            env              TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(env)),
            parent_workspace TEXT,
            parent_snapshot  TEXT
        ) STRICT
        """
    )
    db.execute("CREATE INDEX workspaces_by_created ON workspaces (created_at, id)")
    db.execute(
        """
        CREATE TABLE sessions (
            id         TEXT PRIMARY KEY,
            pid        INTEGER NOT NULL,
            client     TEXT NOT NULL DEFAULT '',
            started_at REAL NOT NULL,
            ended_at   REAL
        ) STRICT
        """
    )


def _v2_network(db: sqlite3.Connection) -> None:
    db.execute(
        "ALTER TABLE workspaces ADD COLUMN network TEXT NOT NULL DEFAULT '{}'"
        " CHECK (json_valid(network))"
    )


def _v3_snapshots(db: sqlite3.Connection) -> None:
    # `head`: the snapshot the workspace's current state descends from.
    db.execute("ALTER TABLE workspaces ADD COLUMN head TEXT")
    db.execute(
        """
        CREATE TABLE snapshots (
            workspace   TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
            name        TEXT NOT NULL,
            volume      TEXT NOT NULL,
            helper_name TEXT NOT NULL,
            parent      TEXT,
            description TEXT NOT NULL DEFAULT '',
            memory      INTEGER NOT NULL CHECK (memory IN (0, 1)),
            created_at  REAL NOT NULL,
            PRIMARY KEY (workspace, name)
        ) STRICT
        """
    )


def _v4_time_limits(db: sqlite3.Connection) -> None:
    db.execute(
        "ALTER TABLE workspaces ADD COLUMN time_limits TEXT NOT NULL DEFAULT '{}'"
        " CHECK (json_valid(time_limits))"
    )


def _v5_golden(db: sqlite3.Connection) -> None:
    # A golden workspace (workspace_prepare): the arguments it was prepared
    # with (to answer a repeat call, or refuse a changed one) and whether it
    # is `ready` or still `preparing` (a crash leaves that: redone next time).
    db.execute(
        """
        CREATE TABLE golden (
            workspace  TEXT PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
            args       TEXT NOT NULL CHECK (json_valid(args)),
            state      TEXT NOT NULL CHECK (state IN ('preparing', 'ready')),
            commit_id  TEXT,
            updated_at REAL NOT NULL
        ) STRICT
        """
    )


Migration = Callable[[sqlite3.Connection], None]

#: Schema steps in order; the database's ``user_version`` is how many ran.
#: Append, never edit or reorder: a step that ran on a user's file is history.
MIGRATIONS: Sequence[Migration] = (
    _v1_workspaces_and_sessions, _v2_network, _v3_snapshots, _v4_time_limits, _v5_golden,
)

_WS_COLUMNS = tuple(f.name for f in dataclasses.fields(WorkspaceRecord))
_SESSION_COLUMNS = tuple(f.name for f in dataclasses.fields(SessionRecord))
#: What update_workspace may change (id and created_at are fixed; updated_at is ours).
UPDATABLE = frozenset(_WS_COLUMNS) - {"id", "created_at", "updated_at"}


def _to_row(field: str, value: Any) -> Any:
    if field in ("env", "network", "time_limits"):
        return json.dumps(dict(value), sort_keys=True)
    if field == "state":
        return str(State(value))
    if field == "allow_internet":
        return int(bool(value))
    return value


def _workspace(row: sqlite3.Row) -> WorkspaceRecord:
    try:
        values = {k: row[k] for k in _WS_COLUMNS}
        values["state"] = State(values["state"])
        values["allow_internet"] = bool(values["allow_internet"])
        env = json.loads(values["env"])
        if not isinstance(env, dict):
            raise ValueError("env is not an object")
        values["env"] = env
        for key in ("network", "time_limits"):
            value = json.loads(values[key])
            if not isinstance(value, dict):
                raise ValueError(f"{key} is not an object")
            values[key] = value
        return WorkspaceRecord(**values)
    except (ValueError, TypeError) as exc:
        raise CatalogError(
            f"the catalog's row for workspace {row['id']!r} is unreadable ({exc})",
            "This agentiso may be older than the one that wrote it: upgrade agentiso.",
        ) from None


def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
    values = {f.name: row[f.name] for f in dataclasses.fields(SnapshotRecord)}
    values["memory"] = bool(values["memory"])
    return SnapshotRecord(**values)


def _session(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(**{k: row[k] for k in _SESSION_COLUMNS})


def _integrity_error_column(exc: sqlite3.IntegrityError) -> str:
    """The column of a UNIQUE/PRIMARY KEY violation ('' if another kind)."""
    m = re.search(r"UNIQUE constraint failed: \w+\.(\w+)", str(exc))
    return m.group(1) if m else ""


def _check_env(env: Mapping[str, str]) -> None:
    if len(env) > MAX_ENV_KEYS:
        raise InvalidEnv(f"{len(env)} variables")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise InvalidEnv(f"bad variable name {str(key)[:100]!r}")
        if not isinstance(value, str) or "\0" in value or len(value.encode()) > MAX_ENV_VALUE:
            raise InvalidEnv(f"bad value for {key}")
