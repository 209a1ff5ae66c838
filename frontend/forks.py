"""Forks: new workspaces from a snapshot of another, each with its own disk
and identity.  A mixin of :class:`~.workspaces.Workspaces`.

* From a snapshot with memory (a *live fork*, or a named memory snapshot),
  each fork resumes that memory on its own copy-on-write clone of the disk,
  and the helper gives it a new identity while it resumes (address, MAC,
  hostname, machine-id, fresh randomness, the clock): running processes go
  on in every fork at once, each reachable at its own address.
* From a disk-only snapshot, each fork boots its clone; the helper gives it a
  new address, MAC and machine-id (a clone's first boot is a new machine).

``snapshot`` omitted forks the current state: a running workspace is
snapshotted with its memory first (a live fork), a stopped one disk-only.
The whole batch's quotas (workspaces, vCPUs, memory, disk) are checked
before anything is made, the live snapshot included; each fork is then made
like a create (a row checked against the quotas again in the catalog's
transaction, for races with other sessions, then the helper's resources,
undone on failure).  A batch reports each fork's success or failure and never
leaves a half-made one.  When no fork of it was made, the snapshot taken for
it is deleted again; the helper cannot delete a snapshot of a running
workspace's disk, so after a failed live fork it is kept and the batch's
``note`` says so (delete it after a stop).
"""

from __future__ import annotations

import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import anyio
import structlog

from agentiso.protocol import helper as hp

from . import lifecycle, quotas
from .catalog import Catalog, SnapshotRecord, WorkspaceRecord, validate_workspace_name
from .config import FrontendConfig
from .helper_client import HelperClient
from .lifecycle import Event, Operation, State
from .sessions import Session
from .workspace_errors import WorkspaceError

log = structlog.get_logger(__name__)


class ForkError(WorkspaceError):
    pass


@dataclass(frozen=True)
class ForkOutcome:
    name: str
    record: WorkspaceRecord | None
    vm: hp.VmInfo | None
    error: BaseException | None


@dataclass(frozen=True)
class ForkBatch:
    source: WorkspaceRecord
    snapshot: SnapshotRecord
    outcomes: list[ForkOutcome]
    #: What else the caller should know (a snapshot kept although no fork was made).
    note: str = ""


class ForkOps:
    """Fork operations (mixed into the orchestrator)."""

    catalog: Catalog
    config: FrontendConfig
    session: Session

    def owned(self, ref: str) -> WorkspaceRecord:
        raise NotImplementedError

    def helper_call(self) -> AbstractAsyncContextManager[HelperClient]:
        raise NotImplementedError

    def _policy(self, rec: WorkspaceRecord) -> hp.NetworkPolicy:
        raise NotImplementedError

    def _advance(self, rec: WorkspaceRecord, event: Event, reason: str = "") -> WorkspaceRecord:
        raise NotImplementedError

    async def _undo_create(self, rec: WorkspaceRecord, exc: BaseException) -> None:
        raise NotImplementedError

    async def _ping(self, rec: WorkspaceRecord) -> None:
        raise NotImplementedError

    def _time_limits(self, rec: WorkspaceRecord) -> hp.TimeLimits | None:
        raise NotImplementedError

    async def snapshot_create(self, ref: str, name: str, description: str,
                              include_memory: bool) -> SnapshotRecord:
        raise NotImplementedError

    def _node(self, rec: WorkspaceRecord, name: str) -> SnapshotRecord:
        raise NotImplementedError

    async def snapshot_delete(self, ref: str, name: str) -> None:
        raise NotImplementedError

    async def fork(self, ref: str, *, snapshot: str | None, count: int,
                   name_prefix: str | None) -> ForkBatch:
        src = self.owned(ref)
        lifecycle.require(src.name, src.state, Operation.FORK)
        most = self.config.quotas.forks_per_call
        if count > most:
            raise ForkError(f"{count} forks asked in one call, above the limit of {most}",
                            "Ask for fewer, or raise [quotas] forks_per_call in config.toml.")
        prefix = validate_workspace_name(name_prefix or src.name[:40])
        names = [f"{prefix}-{i}" for i in range(1, count + 1)]
        taken = [n for n in names if self.catalog.find_workspace(n) is not None]
        if taken:
            raise ForkError(f"workspaces named {', '.join(taken)} exist already",
                            "Choose another name_prefix.")
        # The whole batch first, before the live snapshot: a batch the quotas
        # cannot hold is refused with nothing made.  Each fork checks again.
        quotas.check(self.config.quotas, self.catalog.list_workspaces(), self.session.id,
                     batch_ask(src, count))
        if snapshot is None:
            live = src.state is State.RUNNING
            snap = await self.snapshot_create(
                src.id, f"fork-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
                f"taken to fork {count}", include_memory=live)
        else:
            snap = self._node(src, snapshot)
        outcomes: list[ForkOutcome] = []
        note = ""
        try:
            for name in names:  # one at a time: each resume or boot is CPU-bound here
                outcomes.append(await self._fork_one(src, snap, name))
        finally:
            if snapshot is None and not any(o.error is None for o in outcomes):
                with anyio.CancelScope(shield=True):
                    note = await self._drop_unused(src, snap)
        return ForkBatch(src, snap, outcomes, note)

    async def _drop_unused(self, src: WorkspaceRecord, snap: SnapshotRecord) -> str:
        """Delete the snapshot taken for a batch none of whose forks was made
        (it would only count toward snapshots_per_workspace).  Returns "" or,
        when it had to be kept, a sentence saying so."""
        try:
            await self.snapshot_delete(src.id, snap.name)
        except Exception as exc:
            log.warning("fork_snapshot_kept", workspace=src.name, snapshot=snap.name,
                        error=str(exc))
            return (f"no fork was made, and the snapshot {snap.name!r} taken for them is "
                    f"kept ({str(exc).splitlines()[0]}); delete it with snapshot_delete "
                    "once the workspace is stopped")
        return ""

    async def _fork_one(self, src: WorkspaceRecord, snap: SnapshotRecord,
                        name: str) -> ForkOutcome:
        wid = self.catalog.new_workspace_id()
        now = time.time()
        rec = WorkspaceRecord(
            id=wid, name=name, image=src.image, vcpus=src.vcpus, memory_mb=src.memory_mb,
            disk_gb=src.disk_gb, allow_internet=src.allow_internet, state=State.CREATING,
            vm=wid, volume=wid, session=self.session.id, created_at=now, updated_at=now,
            env=dict(src.env), parent_workspace=src.id, parent_snapshot=snap.name,
            network={k: v for k, v in src.network.items() if k != "forwards"},
            time_limits=dict(src.time_limits),
        )
        ask = batch_ask(src, 1)
        try:
            self.catalog.add_workspace(rec, check=lambda rows: quotas.check(
                self.config.quotas, rows, self.session.id, ask))
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            return ForkOutcome(name, None, None, exc)
        try:
            source = hp.FromSnapshot(volume=snap.volume, snapshot=snap.helper_name)
            async with self.helper_call() as h:
                await h.volume_create(name=wid, source=source,
                                      timeout=float(self.config.limits.boot_timeout_secs))
                vm = await h.vm_start(
                    name=wid, volume=wid, vcpus=rec.vcpus, memory_mib=rec.memory_mb,
                    network=self._policy(rec),
                    resume_from=source if snap.memory else None,
                    time_limits=self._time_limits(rec),
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
            await self._ping(rec)
            rec = self._advance(rec, Event.CREATED)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._undo_create(rec, exc)
            if not isinstance(exc, Exception):
                raise
            return ForkOutcome(name, None, None, exc)
        return ForkOutcome(name, rec, vm, None)


def batch_ask(src: WorkspaceRecord, count: int) -> quotas.Ask:
    """What ``count`` forks of ``src`` add to the quotas (each runs, with src's size)."""
    return quotas.Ask(workspaces=count, vcpus=src.vcpus * count,
                      memory_mb=src.memory_mb * count, disk_gb=(src.disk_gb or 1) * count)
