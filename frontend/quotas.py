"""Quotas: what one user and one session may hold, checked before anything is made.

Pure: :func:`check` is given the catalog's rows (inside the catalog's write
transaction, so two frontends cannot both squeeze under one limit) and the
request, and raises :class:`QuotaExceeded` naming the limit, the use and the
request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .catalog import WorkspaceRecord
from .config import Quotas
from .lifecycle import State
from .workspace_errors import WorkspaceError


class QuotaExceeded(WorkspaceError):
    def __init__(self, what: str, scope: str, used: int, asked: int, limit: int,
                 unit: str = "") -> None:
        u = f" {unit}" if unit else ""
        super().__init__(
            f"quota exceeded: {what} per {scope}: {used}{u} in use + {asked}{u} asked "
            f"> {limit}{u} allowed",
            "Stop or destroy a workspace of yours, ask for less, or raise [quotas] in "
            "your agentiso config.toml",
        )
        self.what = what
        self.scope = scope


@dataclass(frozen=True)
class Ask:
    """What a create (``workspaces=1``) or a start (``workspaces=0``) adds."""

    workspaces: int
    vcpus: int
    memory_mb: int
    disk_gb: int


def _use(rows: Iterable[WorkspaceRecord], default_disk_gb: int) -> Ask:
    rows = list(rows)
    live = [r for r in rows if r.state is not State.STOPPED]
    return Ask(
        workspaces=len(rows),
        vcpus=sum(r.vcpus for r in live),
        memory_mb=sum(r.memory_mb for r in live),
        disk_gb=sum(r.disk_gb or default_disk_gb for r in rows),
    )


def check(q: Quotas, rows: list[WorkspaceRecord], session: str, ask: Ask,
          default_disk_gb: int = 1, exclude: str | None = None) -> None:
    """Raise QuotaExceeded if ``ask`` on top of ``rows`` passes a quota.
    ``exclude``: a row not to count (the workspace being started)."""
    rows = [r for r in rows if r.id != exclude]
    for scope, scoped, limits in (
        ("user", rows, (q.workspaces, q.vcpus, q.memory_mb, q.disk_gb)),
        ("session", [r for r in rows if r.session == session],
         (q.workspaces_per_session, q.vcpus_per_session, q.memory_mb_per_session,
          q.disk_gb_per_session)),
    ):
        use = _use(scoped, default_disk_gb)
        for what, used, asked, limit, unit in (
            ("workspaces", use.workspaces, ask.workspaces, limits[0], ""),
            ("vcpus", use.vcpus, ask.vcpus, limits[1], ""),
            ("memory", use.memory_mb, ask.memory_mb, limits[2], "MB"),
            ("disk", use.disk_gb, ask.disk_gb, limits[3], "GB"),
        ):
            if asked and used + asked > limit:
                raise QuotaExceeded(what, scope, used, asked, limit, unit)
