"""Snapshots of volumes whose VM runs (disk, and optionally memory).

``SnapshotCreate`` of a volume without a running VM is the workspace
service's plain snapshot; with one, the guest takes part (sync and freeze, or
a paused VM whose memory is saved) so the snapshot is consistent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import structlog

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from ..errors import HelperError, RequestFailed
from ..registry import SnapshotRecord, VmRecord, VolumeRecord
from ..relay import GuestChannel
from ..server import RequestContext
from ..service import WorkspaceService
from ..vm.engine import VmEngine
from .channels import GuestChannels
from .lifecycle import GUEST_CALL_TIMEOUT_S
from .network import VmNetwork

log = structlog.get_logger("agentiso.helper.vms")

#: Longest a guest stays frozen for a snapshot if the helper died meanwhile.
FREEZE_AUTO_THAW_S = 60.0
MEMORY_FILE_SUFFIX = ".mem"


@dataclass
class LiveSnapshots:
    """Handles SnapshotCreate (of any volume: one without a running VM is
    handed to the workspace service).

    The snapshot's name is checked, and the snapshot taken and recorded,
    under ``ws.lock`` (the registry's lock), so two requests cannot both make
    a snapshot of one name.
    """

    HANDLES: ClassVar[dict[type[Any], str]] = {hp.SnapshotCreate: "snapshot_create"}

    ws: WorkspaceService
    engine: VmEngine
    channels: GuestChannels
    network: VmNetwork

    async def snapshot_create(self, req: hp.SnapshotCreate, ctx: RequestContext) -> hp.VolumeInfo:
        ws = self.ws
        vol = ws.registry.volume(ctx.owner, req.volume)
        vm = ws.registry.vm_on_volume(vol.key)
        if vm is None:
            return await ws.snapshot_create(req, ctx)
        async with ws.lock:
            if any(s.name == req.snapshot for s in vol.snapshots):
                raise RequestFailed(
                    ErrorCode.ALREADY_EXISTS,
                    f"volume {req.volume!r} already has a snapshot {req.snapshot!r}",
                )
            channel = self.channels.of_running(vm)
            memory_file = await self._live_snapshot(vol, vm, channel, req.snapshot, req.memory)
            address = self.network.address_of(vm.key) if memory_file is not None else None
            vol.snapshots.append(
                SnapshotRecord(
                    name=req.snapshot, created=time.time(), memory_file=memory_file,
                    address=address,
                    vcpus=vm.vcpus if memory_file is not None else None,
                    memory_mib=vm.memory_mib if memory_file is not None else None,
                    secret=vm.secret if memory_file is not None else None,
                )
            )
            ws.registry.save()
            info = await ws.storage.volume_info(vol.key)
        return ws.volume_info(req.id, vol, info)

    async def _live_snapshot(
        self, vol: VolumeRecord, vm: VmRecord, channel: GuestChannel, snap: str, memory: bool
    ) -> str | None:
        """Consistent snapshot of a running VM's disk (and optionally memory).

        Disk only: the guest syncs and freezes its filesystem, the disk is
        snapshotted, the guest thaws.  With memory: the VM is paused and its
        state saved (QEMU flushes the disk), the disk is snapshotted while
        paused, then the VM resumes: disk and memory are of the same instant.
        """
        storage = self.ws.storage
        memory_file: str | None = None
        if memory:
            memory_file = f"{vol.key}-{snap}{MEMORY_FILE_SUFFIX}"
            path = self.ws.memory_dir / memory_file
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                await channel.call(gp.Sync(id=0), GUEST_CALL_TIMEOUT_S)
                await self.engine.save_memory(vm.key, fd)
            except BaseException:
                path.unlink(missing_ok=True)
                with anyio.CancelScope(shield=True):
                    await self._resume_quietly(vm.key)
                raise
            finally:
                os.close(fd)
        else:
            await channel.call(
                gp.Freeze(id=0, auto_thaw_s=FREEZE_AUTO_THAW_S), GUEST_CALL_TIMEOUT_S
            )
        try:
            plan = await storage.prepare_snapshot(vol.key, snap)
            switched = False
            try:
                if plan.new_top is not None:
                    # qcow2: QEMU switches to the new top the backend made.
                    await self.engine.switch_to_overlay(vm.key, str(plan.new_top.path))
                    switched = True
                await storage.commit_snapshot(plan)
            except BaseException:
                if switched:
                    # QEMU writes to the new top now: it must not be removed.
                    log.error("snapshot_commit_failed_after_switch", vm=vm.key, snapshot=snap)
                else:
                    with anyio.CancelScope(shield=True):
                        await storage.abort_snapshot(plan)
                raise
        except BaseException:
            if memory_file is not None:
                (self.ws.memory_dir / memory_file).unlink(missing_ok=True)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if memory:
                    await self._resume_quietly(vm.key)
                else:
                    await self._thaw_quietly(channel)
        return memory_file

    async def _resume_quietly(self, key: str) -> None:
        try:
            await self.engine.resume(key)
        except HelperError as exc:
            log.error("vm_resume_failed", vm=key, error=exc.message)

    async def _thaw_quietly(self, channel: GuestChannel) -> None:
        # GuestChannel.call bounds itself and raises only HelperErrors.
        try:
            await channel.call(gp.Thaw(id=0), GUEST_CALL_TIMEOUT_S)
        except HelperError as exc:
            log.error("guest_thaw_failed", vm=channel.name, error=exc.message)
