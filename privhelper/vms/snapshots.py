"""Snapshots of volumes whose VM runs (disk, and optionally memory).

``SnapshotCreate`` of a volume without a running VM is the workspace
service's plain snapshot; with one, the guest takes part (sync and freeze, or
a paused VM whose memory is saved) so the snapshot is consistent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
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
from ..storage import quotas
from ..vm.engine import VmEngine
from .channels import GuestChannels
from .lifecycle import GUEST_CALL_TIMEOUT_S
from .network import VmNetwork

log = structlog.get_logger("agentiso.helper.vms")

#: Longest a guest stays frozen for a snapshot if the helper died meanwhile.
FREEZE_AUTO_THAW_S = 60.0
MEMORY_FILE_SUFFIX = ".mem"
#: The thaw sent after a freeze that failed or timed out (the guest may have
#: frozen late) waits this long at most: that guest already cost a timeout.
LATE_THAW_TIMEOUT_S = 5.0
#: How often a memory save's file size is checked against its bound.
MEMORY_WATCH_S = 0.2


@dataclass
class LiveSnapshots:
    """Handles SnapshotCreate (of any volume: one without a running VM is
    handed to the workspace service).

    Locking: ``ws.lock`` (the registry's lock, shared by every uid) is held
    only for the checks and for recording the result, never across a wait on
    the guest or QEMU (freeze, memory save, resume).  While a snapshot of a
    volume is in progress the volume is marked busy here, so a second
    snapshot of it is refused (``conflict``) instead of waiting; another
    uid's start, stop or create never waits for a guest.

    Quotas (``[storage]``): snapshots per uid, bytes of saved memory per uid
    (a memory snapshot in progress counts as its VM's RAM), and the free-space
    reserve of the state filesystem; all checked before anything is made.
    """

    HANDLES: ClassVar[dict[type[Any], str]] = {hp.SnapshotCreate: "snapshot_create"}

    ws: WorkspaceService
    engine: VmEngine
    channels: GuestChannels
    network: VmNetwork
    #: volume key -> (owner, bytes of memory state it may still write) while a
    #: snapshot of that volume is in progress.
    _in_progress: dict[str, tuple[int, int]] = field(default_factory=dict)

    async def snapshot_create(self, req: hp.SnapshotCreate, ctx: RequestContext) -> hp.VolumeInfo:
        ws = self.ws
        async with ws.lock:  # checks and the busy mark only: no waiting in here
            vol = ws.registry.volume(ctx.owner, req.volume)
            vm = ws.registry.vm_on_volume(vol.key)
            if vol.key in self._in_progress:
                raise RequestFailed(
                    ErrorCode.CONFLICT,
                    f"a snapshot of volume {req.volume!r} is in progress; retry when it ends",
                )
            if any(s.name == req.snapshot for s in vol.snapshots):
                raise RequestFailed(
                    ErrorCode.ALREADY_EXISTS,
                    f"volume {req.volume!r} already has a snapshot {req.snapshot!r}",
                )
            memory_bound = (
                quotas.memory_state_bound(vm.memory_mib) if req.memory and vm is not None else 0
            )
            self._check_quotas(ctx.owner, memory_bound)
            self._in_progress[vol.key] = (ctx.owner, memory_bound)
        try:
            if vm is None:
                return await ws.snapshot_create(req, ctx)
            channel = self.channels.of_running(vm)
            memory_file = await self._live_snapshot(vol, vm, channel, req.snapshot, req.memory)
            async with ws.lock:
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
                # A full disk here leaves the snapshot made and in the helper's
                # memory (the next save records it): StateFilesystemFull.
                ws.registry.save()
        finally:
            self._in_progress.pop(vol.key, None)
        info = await ws.storage.volume_info(vol.key)
        return ws.volume_info(req.id, vol, info)

    def _check_quotas(self, owner: int, memory_bound: int) -> None:
        """Refuse (``limit_exceeded``) a snapshot over ``owner``'s quotas or
        below the state filesystem's reserve.  Caller holds ``ws.lock``."""
        cfg = self.ws.config.storage
        mine = self.ws.registry.volumes(owner)
        pending = [b for o, b in self._in_progress.values() if o == owner]
        files = [
            self.ws.memory_dir / s.memory_file
            for v in mine for s in v.snapshots if s.memory_file is not None
        ]
        use = quotas.SnapshotUse(
            snapshots=sum(len(v.snapshots) for v in mine) + len(pending),
            memory_bytes=quotas.file_bytes(files) + sum(pending),
        )
        quotas.check_snapshot(
            use, max_snapshots=cfg.per_uid_snapshots,
            max_memory_bytes=cfg.per_uid_memory_state_bytes, memory_bytes=memory_bound,
        )
        # Memory states of other uids in progress take room too.
        others = sum(b for o, b in self._in_progress.values() if o != owner)
        quotas.check_reserve(
            quotas.free_bytes(self.ws.memory_dir), cfg.reserve_free_bytes,
            memory_bound + others,
        )

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
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if quotas.is_full(exc):
                    raise quotas.StateFilesystemFull("creating a memory state file") from None
                raise
            try:
                await channel.call(gp.Sync(id=0), GUEST_CALL_TIMEOUT_S)
                await self._save_memory(vm, fd)
            except BaseException:
                path.unlink(missing_ok=True)
                with anyio.CancelScope(shield=True):
                    await self._resume_quietly(vm.key)
                raise
            finally:
                os.close(fd)
        else:
            try:
                await channel.call(
                    gp.Freeze(id=0, auto_thaw_s=FREEZE_AUTO_THAW_S), GUEST_CALL_TIMEOUT_S
                )
            except BaseException:
                # A guest that answers late may freeze after we gave up: thaw
                # (bounded), so it is not left frozen until its auto-thaw.
                with anyio.CancelScope(shield=True):
                    await self._thaw_quietly(channel, LATE_THAW_TIMEOUT_S)
                raise
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

    async def _save_memory(self, vm: VmRecord, fd: int) -> None:
        """QEMU writes the VM's state to ``fd``, watched: a file growing past
        what the VM's RAM can explain (a compromised QEMU filling the disk) is
        cut off, and a save that failed for want of space says so."""
        bound = quotas.memory_state_bound(vm.memory_mib)
        too_big = False
        failed: HelperError | None = None

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal too_big
            while True:
                if os.fstat(fd).st_size > bound:
                    too_big = True
                    scope.cancel()
                    return
                await anyio.sleep(MEMORY_WATCH_S)

        # Errors leave the task group as values: raised inside it they would
        # come out wrapped in an ExceptionGroup, not as the typed error.
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            try:
                await self.engine.save_memory(vm.key, fd)
            except HelperError as exc:
                failed = exc
            tg.cancel_scope.cancel()
        if too_big:
            raise quotas.QuotaExceeded(
                f"the saved memory of VM {vm.name!r} grew past {bound} bytes, more than its "
                f"{vm.memory_mib} MiB of RAM can explain; the save was stopped"
            )
        if failed is not None:
            if quotas.free_bytes(self.ws.memory_dir) < quotas.MIB:
                raise quotas.StateFilesystemFull("saving the VM's memory") from None
            raise failed

    async def _resume_quietly(self, key: str) -> None:
        try:
            await self.engine.resume(key)
        except HelperError as exc:
            log.error("vm_resume_failed", vm=key, error=exc.message)

    async def _thaw_quietly(
        self, channel: GuestChannel, timeout_s: float = GUEST_CALL_TIMEOUT_S
    ) -> None:
        # GuestChannel.call bounds itself and raises only HelperErrors.
        try:
            await channel.call(gp.Thaw(id=0), timeout_s)
        except HelperError as exc:
            log.error("guest_thaw_failed", vm=channel.name, error=exc.message)
