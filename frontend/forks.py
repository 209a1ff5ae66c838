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
Each fork is made like a create (a row, then the helper's resources, undone
on failure); a batch reports each fork's success or failure and never leaves
a half-made one.
"""

from __future__ import annotations

import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import anyio

from agentiso.protocol import helper as hp

from . import lifecycle, quotas
from .catalog import Catalog, SnapshotRecord, WorkspaceRecord, validate_workspace_name
from .config import FrontendConfig
from .helper_client import HelperClient
from .lifecycle import Event, Operation, State
from .sessions import Session
from .workspace_errors import WorkspaceError


class ForkError(WorkspaceError):
    pass


@dataclass(frozen=True)
class ForkOutcome:
    name: str
    record: WorkspaceRecord | None
    vm: hp.VmInfo | None
    error: BaseException | None


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

    async def fork(self, ref: str, *, snapshot: str | None, count: int,
                   name_prefix: str | None) -> tuple[WorkspaceRecord, SnapshotRecord,
                                                     list[ForkOutcome]]:
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
        if snapshot is None:
            live = src.state is State.RUNNING
            snap = await self.snapshot_create(
                src.id, f"fork-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
                f"taken to fork {count}", include_memory=live)
        else:
            snap = self._node(src, snapshot)
        outcomes = []
        for name in names:  # one at a time: each resume or boot is CPU-bound here
            outcomes.append(await self._fork_one(src, snap, name))
        return src, snap, outcomes

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
        ask = quotas.Ask(workspaces=1, vcpus=src.vcpus, memory_mb=src.memory_mb,
                         disk_gb=src.disk_gb or 1)
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
