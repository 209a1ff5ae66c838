"""Snapshots of a workspace: a tree, restorable at any node.

A mixin of :class:`~.workspaces.Workspaces`.  The helper's volumes roll back
linearly (a rollback discards the snapshots after it, like ``zfs rollback
-r``), so the tree lives here:

* a snapshot is taken on the workspace's current volume and recorded in the
  catalog with its parent (the workspace's ``head``);
* restoring the newest snapshot of the current volume rolls that volume back
  in place (only unsaved changes are discarded);
* restoring any other node makes the workspace a copy-on-write clone of it:
  a new volume, the old one kept because it holds nodes of the tree, so
  every node stays restorable.  A memory state is resumed only in place (the
  helper resumes memory on the volume that holds it); a clone restore brings
  the disk back and boots, and says so.

Deleting a node that something was built on (a clone made by a restore, or a
fork) is refused with what depends on it.
"""

from __future__ import annotations

import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import Conflict, NotFound

from . import lifecycle
from .catalog import Catalog, SnapshotRecord, WorkspaceRecord
from .config import FrontendConfig
from .helper_client import HelperClient
from .lifecycle import Operation, State
from .workspace_errors import WorkspaceError

#: A live snapshot freezes the guest and may save its memory: give it time.
SNAPSHOT_TIMEOUT_S = 180.0


class SnapshotError(WorkspaceError):
    pass


@dataclass(frozen=True)
class Restored:
    record: WorkspaceRecord
    snapshot: SnapshotRecord
    discarded: list[str]
    memory_restored: bool
    note: str


class SnapshotOps:
    """Snapshot operations on workspaces (mixed into the orchestrator)."""

    catalog: Catalog
    config: FrontendConfig

    def owned(self, ref: str) -> WorkspaceRecord:
        raise NotImplementedError

    def helper_call(self) -> AbstractAsyncContextManager[HelperClient]:
        raise NotImplementedError

    async def stop(self, ref: str, *, force: bool = False) -> WorkspaceRecord:
        raise NotImplementedError

    async def _boot(self, rec: WorkspaceRecord, resume: str | None) -> object:
        raise NotImplementedError

    def _node(self, rec: WorkspaceRecord, name: str) -> SnapshotRecord:
        for s in self.catalog.list_snapshots(rec.id):
            if s.name == name:
                return s
        raise SnapshotError(f"workspace {rec.name!r} has no snapshot named {name!r}",
                            "See its snapshots with snapshot_list.")

    async def snapshot_create(self, ref: str, name: str, description: str,
                              include_memory: bool) -> SnapshotRecord:
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.SNAPSHOT)
        if include_memory and rec.state is not State.RUNNING:
            raise SnapshotError(f"workspace {rec.name!r} is {rec.state}: it has no memory to "
                                "save", "Start it first, or snapshot without include_memory.")
        limit = self.config.quotas.snapshots_per_workspace
        snap = SnapshotRecord(
            workspace=rec.id, name=name, volume=rec.volume,
            helper_name="s" + secrets.token_hex(6), parent=rec.head,
            description=description, memory=include_memory, created_at=time.time(),
        )
        self.catalog.add_snapshot(snap, max_count=limit)  # quota and name, atomically
        try:
            async with self.helper_call() as h:
                await h.snapshot_create(volume=rec.volume, snapshot=snap.helper_name,
                                        memory=include_memory, timeout=SNAPSHOT_TIMEOUT_S)
        except BaseException:
            self.catalog.delete_snapshot(rec.id, name)
            self.catalog.update_workspace(rec.id, head=rec.head)
            raise
        return snap

    async def snapshot_tree(self, ref: str) -> tuple[WorkspaceRecord, list[SnapshotRecord],
                                                     dict[tuple[str, str], int]]:
        """The nodes, and the bytes each takes in the helper (by volume and name)."""
        rec = self.catalog.get_workspace(ref)
        nodes = self.catalog.list_snapshots(rec.id)
        sizes: dict[tuple[str, str], int] = {}
        async with self.helper_call() as h:
            for volume in {s.volume for s in nodes}:
                try:
                    info = await h.volume_get(name=volume)
                except NotFound:
                    continue
                for si in info.snapshots:
                    sizes[(volume, si.name)] = si.used_bytes
        return rec, nodes, sizes

    async def snapshot_restore(self, ref: str, name: str) -> Restored:
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.RESTORE)
        target = self._node(rec, name)
        nodes = self.catalog.list_snapshots(rec.id)
        was_running = rec.state is State.RUNNING
        discarded = [f"changes made since snapshot {rec.head!r}" if rec.head
                     else "changes made since the workspace was created"]
        if rec.state is not State.STOPPED:
            rec = await self.stop(rec.id, force=True)
        later = [s for s in nodes if s.volume == target.volume
                 and s.created_at > target.created_at]
        in_place = target.volume == rec.volume and not later
        async with self.helper_call() as h:
            if in_place:
                await h.snapshot_rollback(volume=rec.volume, snapshot=target.helper_name)
            else:
                new_volume = f"{rec.id}-{secrets.token_hex(3)}"
                await h.volume_create(name=new_volume, source=hp.FromSnapshot(
                    volume=target.volume, snapshot=target.helper_name),
                    timeout=float(self.config.limits.boot_timeout_secs))
                old = rec.volume
                rec = self.catalog.update_workspace(rec.id, volume=new_volume)
                if not any(s.volume == old for s in nodes):
                    # The old volume held only the discarded state.
                    try:
                        await h.volume_destroy(name=old)
                    except (NotFound, Conflict):
                        pass
        rec = self.catalog.update_workspace(rec.id, head=target.name)
        resume = target.helper_name if target.memory and in_place else None
        if was_running or resume:
            await self._boot(rec, resume)
            rec = self.catalog.get_workspace(rec.id)
        note = ""
        if target.memory and not in_place:
            note = ("its memory state was not resumed (only the newest snapshot of the "
                    "current disk can be resumed); the workspace booted from its disk")
        return Restored(rec, target, discarded, resume is not None, note)

    async def snapshot_delete(self, ref: str, name: str) -> None:
        rec = self.owned(ref)
        target = self._node(rec, name)
        forks = [w.name for w in self.catalog.list_workspaces()
                 if w.parent_workspace == rec.id and w.parent_snapshot == name]
        if forks:
            raise SnapshotError(f"snapshot {name!r} is the origin of the workspaces "
                                f"{', '.join(forks)}",
                                "Destroy those forks first, or keep the snapshot.")
        try:
            async with self.helper_call() as h:
                await h.snapshot_delete(volume=target.volume, snapshot=target.helper_name)
                self.catalog.delete_snapshot(rec.id, name)
                if target.volume != rec.volume and not any(
                        s.volume == target.volume for s in self.catalog.list_snapshots(rec.id)):
                    try:
                        await h.volume_destroy(name=target.volume)
                    except (NotFound, Conflict):
                        pass
        except Conflict as exc:
            if "dependent" in exc.message:
                raise SnapshotError(
                    f"snapshot {name!r} cannot be deleted: a later state of the workspace "
                    "was built on it (a restore to it made the workspace a copy of it)",
                    "Keep it, or restore another snapshot and delete the ones built on this "
                    "first.") from None
            raise SnapshotError(
                f"snapshot {name!r} cannot be deleted while the workspace runs on its disk "
                f"({exc.message})",
                "Stop the workspace (workspace_stop), delete the snapshot, then start it "
                "again.") from None
