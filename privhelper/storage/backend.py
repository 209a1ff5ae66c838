"""The one interface every volume backend implements.

Vocabulary:

* a **base** is an immutable image imported from a file the helper chose
  (e.g. ``images_dir/minimal/rootfs.img``); clients never pass paths;
* a **volume** is a workspace's writable disk, created copy-on-write from a base
  or from a snapshot, in time independent of the base's size;
* a **snapshot** is a named, immutable point of a volume's history.

Semantics common to both backends (tested by the same suite):

* ``rollback(vol, snap)`` makes the volume's content what it was at ``snap`` and
  **discards the snapshots taken after it** (ZFS's ``rollback -r``).  It is
  refused with :class:`HasDependents` if one of those later snapshots has clones.
  The volume must not be in use by a VM.
* ``delete_snapshot`` is refused with :class:`HasDependents` while a volume is
  cloned from that snapshot; otherwise its data is merged into what is built on
  it, so the volume's content never changes.  Like snapshots, it has a two-step
  form (``prepare_delete_snapshot``/``commit_delete_snapshot``) for running VMs.
* ``destroy(vol)`` removes the volume and its snapshots.  Clones made from its
  snapshots outlive it (ZFS: ``zfs promote``; qcow2: shared layers are kept
  until their last user goes).  It is refused only for a base with volumes.
* ``grow`` only grows; the guest's filesystem is grown at boot by its init.

All names are re-validated (:mod:`.names`); every failure is a :class:`StorageError`.
Methods are coroutines; a backend serialises its own mutations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .model import (
    Attachment,
    BaseInfo,
    SnapshotDeletion,
    SnapshotInfo,
    SnapshotPlan,
    VolumeInfo,
    VolumeSource,
)


class VolumeBackend(Protocol):
    #: "qcow2" or "zfs".
    kind: str

    async def setup(self) -> None:
        """Check the tools, create the layout; idempotent.  Raises BackendUnavailable."""

    # --- bases ------------------------------------------------------------------
    async def import_base(self, name: str, source: Path) -> BaseInfo:
        """Import ``source`` (raw or qcow2, chosen by the helper) as base ``name``."""

    async def delete_base(self, name: str) -> None:
        """Remove a base; refused with HasDependents while volumes use it."""

    async def list_bases(self) -> list[BaseInfo]: ...

    # --- volumes ----------------------------------------------------------------
    async def create_volume(
        self, name: str, source: VolumeSource, size: int | None = None
    ) -> VolumeInfo:
        """Create volume ``name`` copy-on-write from ``source``.

        ``size`` (bytes) grows the new volume beyond the source's size; None keeps it.
        """

    async def destroy_volume(self, name: str) -> None: ...

    async def volume_info(self, name: str) -> VolumeInfo: ...

    async def list_volumes(self) -> list[VolumeInfo]: ...

    async def grow_volume(self, name: str, size: int) -> VolumeInfo:
        """Grow to ``size`` bytes (a smaller size is InvalidSize).  Volume must be idle."""

    async def attachment(self, name: str) -> Attachment:
        """Where QEMU finds the volume and which files it must be allowed to touch."""

    # --- snapshots --------------------------------------------------------------
    async def prepare_snapshot(self, volume: str, snapshot: str) -> SnapshotPlan:
        """First half of a snapshot: check names, create what QEMU must switch to."""

    async def commit_snapshot(self, plan: SnapshotPlan) -> SnapshotInfo:
        """Second half: record (and for ZFS take) the snapshot."""

    async def abort_snapshot(self, plan: SnapshotPlan) -> None:
        """Undo :meth:`prepare_snapshot` when the engine could not switch QEMU."""

    async def snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        """Snapshot an idle volume (prepare + commit)."""

    async def rollback(self, volume: str, snapshot: str) -> VolumeInfo: ...

    async def delete_snapshot(self, volume: str, snapshot: str) -> None:
        """Delete a snapshot of an idle volume (prepare + commit)."""

    async def prepare_delete_snapshot(self, volume: str, snapshot: str) -> SnapshotDeletion:
        """First half of a deletion: check dependents, say what a running VM must do."""

    async def commit_delete_snapshot(
        self, plan: SnapshotDeletion, *, streamed: bool = False
    ) -> None:
        """Second half: merge offline (unless the engine ``streamed`` it live) and forget."""

    # --- maintenance ------------------------------------------------------------
    async def collect_garbage(self, *, dry_run: bool = True) -> list[str]:
        """Storage objects no volume, base or pending snapshot accounts for.

        (qcow2: layer and temporary files left by a crash between two steps;
        zfs: promoted snapshots nothing depends on any more.)  Files a QEMU
        holds open are never reported.  Returns one line per object; removes
        them unless ``dry_run``.
        """
