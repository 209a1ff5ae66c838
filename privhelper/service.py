"""The workspace service: what each helper request does.

This is orchestration only: it checks ownership (through the per-owner
:class:`~.registry.Registry`), enforces the limits, and calls the volume
backend, the VM engine and the guest relay.  Every client-visible name is the
caller's own; the layers below only ever see the registry's random keys.

Mutations are serialised by one lock: they are short (qemu-img / zfs
metadata operations, a QEMU spawn); waiting for a guest to boot happens
outside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from . import images, limits
from .config import HelperConfig
from .errors import RequestFailed
from .paging import page
from .registry import Registry, SnapshotRecord, VolumeRecord
from .server import RequestContext
from .storage import FromBase, FromSnapshot, VolumeBackend
from .storage import VolumeInfo as BackendVolumeInfo
from .storage.errors import NotFound as StorageNotFound

log = structlog.get_logger("agentiso.helper.service")


@dataclass
class WorkspaceService:
    config: HelperConfig
    registry: Registry
    storage: VolumeBackend
    images_dir: Path
    #: Saved VM memory of snapshots taken with ``memory``.
    memory_dir: Path
    #: Serialises every change to the registry (volumes, snapshots, VMs) with
    #: the checks it depends on: a name is checked free, and taken, under it.
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: Storage keys of volumes whose storage is being made or removed now:
    #: registered (or still registered) while their disk is not there.
    #: VolumeList, which takes no lock, leaves them out instead of failing.
    pending: set[str] = field(default_factory=set)

    # --- wiring ------------------------------------------------------------------------

    #: The request types this service handles (request -> method name).
    #: SnapshotCreate is LiveSnapshots' (it calls :meth:`snapshot_create`
    #: for a volume without a running VM).
    HANDLES: ClassVar[dict[type[Any], str]] = {
        hp.ImageList: "image_list",
        hp.VolumeCreate: "volume_create",
        hp.VolumeDestroy: "volume_destroy",
        hp.VolumeGet: "volume_get",
        hp.VolumeList: "volume_list",
        hp.VolumeGrow: "volume_grow",
        hp.SnapshotRollback: "snapshot_rollback",
        hp.SnapshotDelete: "snapshot_delete",
    }

    # --- usage and limits --------------------------------------------------------------

    def usage(self, owner: int | None) -> limits.Usage:
        vols = self.registry.volumes(owner)
        vms = self.registry.vms(owner)
        return limits.Usage(
            vms=len(vms),
            memory_mib=sum(m.memory_mib for m in vms),
            disk_bytes=sum(v.size_bytes for v in vols),
            volumes=len(vols),
        )

    def check_limits(self, owner: int, delta: limits.Usage) -> None:
        limits.check(self.config.limits, self.usage(owner), self.usage(None), delta)

    # --- images ------------------------------------------------------------------------

    async def image_list(self, req: hp.ImageList, ctx: RequestContext) -> hp.Images:
        found = images.list_images(self.images_dir)
        return hp.Images(
            id=req.id,
            images=[
                hp.ImageInfo(
                    name=i.name,
                    size_bytes=i.manifest.files["rootfs.img"].size,
                    description=i.description[:256],
                )
                for i in found
            ],
        )

    async def _base_for(self, image: images.Image) -> str:
        """Import the image's rootfs as a storage base, once per build."""
        have = {b.name for b in await self.storage.list_bases()}
        if image.base_name not in have:
            log.info("import_base", image=image.name, base=image.base_name)
            await self.storage.import_base(image.base_name, image.rootfs)
        return image.base_name

    # --- volumes -----------------------------------------------------------------------

    async def volume_create(self, req: hp.VolumeCreate, ctx: RequestContext) -> hp.VolumeInfo:
        owner = ctx.owner
        async with self.lock:
            if any(v.name == req.name for v in self.registry.volumes(owner)):
                raise RequestFailed(ErrorCode.ALREADY_EXISTS, f"volume {req.name!r} already exists")
            if isinstance(req.source, hp.FromImage):
                image = images.load_image(self.images_dir, req.source.image)
                source: FromBase | FromSnapshot = FromBase(await self._base_for(image))
                origin = f"image:{image.name}"
                image_name = image.name
                source_size = image.manifest.files["rootfs.img"].size
            else:
                src = self.registry.volume(owner, req.source.volume)
                src.snapshot(req.source.snapshot)  # NotFound unless it exists
                source = FromSnapshot(src.key, req.source.snapshot)
                origin = f"snapshot:{src.name}@{req.source.snapshot}"
                image_name = src.image
                source_size = src.size_bytes
            size = max(req.size_bytes or 0, source_size)
            self.check_limits(owner, limits.Usage(volumes=1, disk_bytes=size))
            rec = self.registry.add_volume(owner, req.name, origin, size, image_name)
            self.pending.add(rec.key)
            try:
                info = await self.storage.create_volume(rec.key, source, req.size_bytes)
            except BaseException:
                self.registry.remove_volume(rec.key)
                raise
            finally:
                self.pending.discard(rec.key)
            rec.size_bytes = info.virtual_size
            if isinstance(source, FromSnapshot):
                rec.pristine_clone_of = f"{source.volume}@{source.snapshot}"
            self.registry.save()
        return self.volume_info(req.id, rec, info)

    async def volume_destroy(self, req: hp.VolumeDestroy, ctx: RequestContext) -> hp.Done:
        async with self.lock:
            await self.destroy_volume(self.registry.volume(ctx.owner, req.name))
        return hp.Done(id=req.id)

    async def destroy_volume(self, rec: VolumeRecord) -> None:
        """Destroy volume ``rec`` (``conflict`` if a VM uses it) with its
        snapshots' saved memory.  The caller holds :attr:`lock`."""
        self._refuse_if_in_use(rec, "destroy")
        self.pending.add(rec.key)
        try:
            await self.storage.destroy_volume(rec.key)
            for snap in rec.snapshots:
                self.drop_memory(snap)
            self.registry.remove_volume(rec.key)
            self.registry.save()
        finally:
            self.pending.discard(rec.key)

    async def volume_get(self, req: hp.VolumeGet, ctx: RequestContext) -> hp.VolumeInfo:
        rec = self.registry.volume(ctx.owner, req.name)
        return self.volume_info(req.id, rec, await self.storage.volume_info(rec.key))

    async def volume_list(self, req: hp.VolumeList, ctx: RequestContext) -> hp.Volumes:
        out = []
        for rec in self.registry.volumes(ctx.owner):
            try:
                info = await self.storage.volume_info(rec.key)
            except StorageNotFound:
                if rec.key in self.pending:  # not made yet, or being removed
                    continue
                raise
            out.append(self.volume_info(0, rec, info))
        volumes, next_cursor = page(out, req.cursor)
        return hp.Volumes(id=req.id, volumes=volumes, next_cursor=next_cursor)

    async def volume_grow(self, req: hp.VolumeGrow, ctx: RequestContext) -> hp.VolumeInfo:
        async with self.lock:
            rec = self.registry.volume(ctx.owner, req.name)
            self._refuse_if_in_use(rec, "grow")
            if req.size_bytes < rec.size_bytes:
                raise RequestFailed(
                    ErrorCode.INVALID,
                    f"volume {req.name!r} is {rec.size_bytes} bytes; volumes only grow",
                )
            self.check_limits(
                ctx.owner, limits.Usage(disk_bytes=req.size_bytes - rec.size_bytes)
            )
            info = await self.storage.grow_volume(rec.key, req.size_bytes)
            rec.size_bytes = info.virtual_size
            self.registry.save()
        return self.volume_info(req.id, rec, info)

    # --- snapshots ---------------------------------------------------------------------

    async def snapshot_create(self, req: hp.SnapshotCreate, ctx: RequestContext) -> hp.VolumeInfo:
        async with self.lock:
            rec = self.registry.volume(ctx.owner, req.volume)
            if any(s.name == req.snapshot for s in rec.snapshots):
                raise RequestFailed(
                    ErrorCode.ALREADY_EXISTS,
                    f"volume {req.volume!r} already has a snapshot {req.snapshot!r}",
                )
            if req.memory:
                raise RequestFailed(
                    ErrorCode.CONFLICT, "a memory snapshot needs a running VM on the volume"
                )
            self._refuse_if_in_use(rec, "snapshot (live snapshots arrive with the VM engine)")
            await self.storage.snapshot(rec.key, req.snapshot)
            rec.snapshots.append(SnapshotRecord(name=req.snapshot, created=time.time()))
            self.registry.save()
            info = await self.storage.volume_info(rec.key)
        return self.volume_info(req.id, rec, info)

    async def snapshot_rollback(
        self, req: hp.SnapshotRollback, ctx: RequestContext
    ) -> hp.VolumeInfo:
        async with self.lock:
            rec = self.registry.volume(ctx.owner, req.volume)
            rec.snapshot(req.snapshot)
            self._refuse_if_in_use(rec, "roll back")
            info = await self.storage.rollback(rec.key, req.snapshot)
            self.sync_snapshots(rec, info)
            self.registry.save()
        return self.volume_info(req.id, rec, info)

    async def snapshot_delete(self, req: hp.SnapshotDelete, ctx: RequestContext) -> hp.Done:
        async with self.lock:
            rec = self.registry.volume(ctx.owner, req.volume)
            rec.snapshot(req.snapshot)
        # Merging a snapshot's data can take seconds per GiB: not under the
        # registry lock (every user's requests take it).  The backend refuses
        # any other operation on this volume until the merge is over.
        await self.storage.delete_snapshot(rec.key, req.snapshot)
        async with self.lock:
            snap = next((s for s in rec.snapshots if s.name == req.snapshot), None)
            if snap is not None:
                self.drop_memory(snap)
                rec.snapshots = [s for s in rec.snapshots if s.name != req.snapshot]
                self.registry.save()
        return hp.Done(id=req.id)

    # --- helpers -----------------------------------------------------------------------

    def _refuse_if_in_use(self, rec: VolumeRecord, what: str) -> None:
        vm = self.registry.vm_on_volume(rec.key)
        if vm is not None:
            raise RequestFailed(
                ErrorCode.CONFLICT,
                f"cannot {what} volume {rec.name!r}: VM {vm.name!r} uses it (stop it first)",
            )

    def sync_snapshots(self, rec: VolumeRecord, info: BackendVolumeInfo) -> None:
        """Keep the registry's snapshot list to what the backend still has."""
        alive = {s.name for s in info.snapshots}
        for s in rec.snapshots:
            if s.name not in alive:
                self.drop_memory(s)
        rec.snapshots = [s for s in rec.snapshots if s.name in alive]

    def drop_memory(self, snap: SnapshotRecord) -> None:
        if snap.memory_file is not None:
            (self.memory_dir / snap.memory_file).unlink(missing_ok=True)

    def volume_info(
        self, rid: int, rec: VolumeRecord, info: BackendVolumeInfo
    ) -> hp.VolumeInfo:
        used = {s.name: s.used_bytes for s in info.snapshots}
        vm = self.registry.vm_on_volume(rec.key)
        return hp.VolumeInfo(
            id=rid,
            name=rec.name,
            size_bytes=info.virtual_size,
            used_bytes=info.used_bytes,
            created=rec.created,
            origin=rec.origin,
            snapshots=[
                hp.SnapshotInfo(
                    name=s.name,
                    created=s.created,
                    used_bytes=used.get(s.name, 0),
                    memory=s.memory_file is not None,
                )
                for s in rec.snapshots
            ],
            vm=vm.name if vm is not None else None,
        )
