"""Errors about workspaces: their state (lifecycle) and their records (catalog).

Every message is two lines: the cause, then what to do (a sentence), like the
frontend's other errors.  Both halves are kept as attributes (``cause``,
``hint``) for callers that format them differently.
"""

from __future__ import annotations

from .errors import FrontendError

#: The tool an agent uses to see what exists (named in not-found hints).
LIST_TOOL = "workspace_list"


class WorkspaceError(FrontendError):
    """Root of the workspace errors: a cause and what to do about it."""

    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


# --- lifecycle -------------------------------------------------------------------------


class InvalidTransition(WorkspaceError):
    """An event that the state machine does not allow in the current state.

    This is a bug in the orchestration (an operation ran without its
    :func:`~agentiso.frontend.lifecycle.require` check) or a race that the
    catalog's compare-and-set should have caught.
    """

    def __init__(self, state: str, event: str) -> None:
        super().__init__(
            f"event {event!r} is not allowed in workspace state {state!r}",
            "This is an internal ordering error: check workspace_info and retry the operation.",
        )
        self.state = state
        self.event = event


class WrongState(WorkspaceError):
    """The workspace's state does not allow the requested operation."""

    def __init__(self, workspace: str, state: str, operation: str, cause: str, hint: str) -> None:
        super().__init__(cause, hint)
        self.workspace = workspace
        self.state = state
        self.operation = operation


# --- catalog ---------------------------------------------------------------------------


class CatalogError(WorkspaceError):
    """The catalog database itself cannot be used (unreadable, newer schema, corrupt)."""


class WorkspaceNotFound(WorkspaceError):
    def __init__(self, ref: str) -> None:
        super().__init__(
            f"no workspace named or with id {ref!r}",
            f"List your workspaces with {LIST_TOOL}.",
        )
        self.ref = ref


class NameTaken(WorkspaceError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"a workspace named {name!r} already exists",
            f"Choose another name, or destroy the existing one (see {LIST_TOOL}).",
        )
        self.name = name


class InvalidName(WorkspaceError):
    def __init__(self, name: str, rule: str) -> None:
        super().__init__(
            f"invalid workspace name {name!r}: {rule}", "Choose a name that follows the rule."
        )
        self.name = name
        self.rule = rule


class StateConflict(WorkspaceError):
    """A compare-and-set of the state lost: the workspace is not in an expected state.

    Usually another frontend (or another call of this one) is operating on the
    same workspace at the same moment.
    """

    def __init__(self, workspace: str, current: str, expected: list[str]) -> None:
        super().__init__(
            f"workspace {workspace!r} is {current}, not {' or '.join(expected)}"
            " (another operation on it is in progress or just finished)",
            "Check it with workspace_info and retry.",
        )
        self.workspace = workspace
        self.current = current
        self.expected = expected


class SessionNotFound(WorkspaceError):
    def __init__(self, session: str) -> None:
        super().__init__(
            f"no session with id {session!r}",
            "Sessions are made when an MCP client connects: reconnect to get one.",
        )
        self.session = session


class SnapshotExists(WorkspaceError):
    def __init__(self, name: str) -> None:
        super().__init__(f"the workspace already has a snapshot named {name!r}",
                         "Choose another name (snapshot_list shows the existing ones).")
        self.name = name


class SnapshotQuota(WorkspaceError):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"quota exceeded: snapshots per workspace: {count} in use + 1 asked > {limit} "
            "allowed",
            "Delete a snapshot (snapshot_delete), or raise [quotas] snapshots_per_workspace "
            "in your agentiso config.toml.")
