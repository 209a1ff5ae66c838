"""VM requests: start, stop, status, console, guest channel, snapshots of
running VMs.

A VM runs on one of its owner's volumes.  It exists from ``VmStart`` until
``VmStop`` (a crashed VM stays, state ``crashed`` with its console tail, until
its owner stops it).  The engine knows it by the registry key; its guest
channel (:class:`~.relay.GuestChannel`) is kept up by a task of this service
for as long as the VM exists.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ByteStream, TaskGroup

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from . import images, limits, vsock
from .errors import HelperError, RequestFailed
from .net.manager import Attachment as NetAttachmentInfo
from .net.manager import NetworkManager
from .net.model import Forward, NetPolicy
from .registry import SnapshotRecord, VmRecord, VolumeRecord
from .relay import GuestChannel
from .server import RequestContext
from .service import WorkspaceService
from .storage import Attachment
from .vm.engine import VmConfig, VmEngine, VmState, VmStatus
from .vm.spec import DiskLayer, NetAttachment

log = structlog.get_logger("agentiso.helper.vms")

#: How long a started VM may take to say hello (TCG boots in ~3 s on 2 cores;
#: leave room for a loaded machine).
HELLO_TIMEOUT_S = 90.0
GUEST_CALL_TIMEOUT_S = 30.0
#: Longest a guest stays frozen for a snapshot if the helper died meanwhile.
FREEZE_AUTO_THAW_S = 60.0
MEMORY_FILE_SUFFIX = ".mem"


@dataclass
class _Running:
    channel: GuestChannel
    scope: anyio.CancelScope


@dataclass
class VmService:
    ws: WorkspaceService
    engine: VmEngine
    tg: TaskGroup
    #: None: the helper gives VMs no network (it could not set the bridge up).
    net: NetworkManager | None = None
    #: Guest channel over vsock (where /dev/vhost-vsock exists), else virtio-serial.
    use_vsock: bool = field(default_factory=vsock.available)
    _running: dict[str, _Running] = field(default_factory=dict)

    def handlers(self) -> dict[type[Any], Callable[[Any, RequestContext], Awaitable[Any]]]:
        return {
            hp.VmStart: self.vm_start,
            hp.VmStop: self.vm_stop,
            hp.VmGet: self.vm_get,
            hp.VmList: self.vm_list,
            hp.VmConsole: self.vm_console,
            hp.VmNetworkSet: self.vm_network_set,
            hp.ForwardAdd: self.forward_add,
            hp.ForwardRemove: self.forward_remove,
            hp.SnapshotCreate: self.snapshot_create,
            hp.AdminList: self.admin_list,
            hp.Gc: self.gc,
        }

    async def open_guest(self, req: hp.GuestOpen, ctx: RequestContext) -> GuestChannel:
        vm = self.ws.registry.vm(ctx.owner, req.vm)
        return self._channel(vm)

    # --- start-up ------------------------------------------------------------------------

    async def adopt(self) -> None:
        """After a helper restart: re-attach to the VMs still running and
        bring their guest channels up again."""
        report = await self.engine.adopt_all()
        for name, why in report.unreadable.items():
            log.error("vm_record_unreadable", vm=name, error=why)
        known = {vm.key for vm in self.ws.registry.vms()}
        for key in report.adopted:
            if key in known:
                self._start_channel(key)
            else:
                log.warning("vm_not_in_registry", vm=key, hint="agentiso-helper gc")
        for st in report.dead:
            log.warning("vm_died_while_helper_was_away", vm=st.name, reason=st.exit_reason)
        log.info("adopted", vms=len(report.adopted), dead=len(report.dead))

    # --- channels --------------------------------------------------------------------------

    def _start_channel(self, key: str) -> GuestChannel:
        rec = next((m for m in self.ws.registry.vms() if m.key == key), None)
        cid = rec.cid if rec is not None else None
        secret = bytes.fromhex(rec.secret) if rec is not None and rec.secret else None

        async def connect() -> ByteStream:
            if cid is not None:
                return await vsock.connect(cid)
            return await anyio.connect_unix(self.engine.channel_socket(key))

        channel = GuestChannel(name=key, connect=connect, secret=secret)
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await channel.run()

        self.tg.start_soon(run)
        self._running[key] = _Running(channel=channel, scope=scope)
        return channel

    def _stop_channel(self, key: str) -> None:
        running = self._running.pop(key, None)
        if running is not None:
            running.scope.cancel()

    def _channel(self, vm: VmRecord) -> GuestChannel:
        running = self._running.get(vm.key)
        if running is None or self._engine_state(vm.key) not in (VmState.RUNNING, None):
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {vm.name!r} is not running")
        return running.channel

    def _engine_state(self, key: str) -> VmState | None:
        try:
            return self.engine.status(key).state
        except HelperError:
            return None

    # --- requests ------------------------------------------------------------------------

    async def vm_start(self, req: hp.VmStart, ctx: RequestContext) -> hp.VmInfo:
        owner = ctx.owner
        ws = self.ws
        async with ws.lock:
            vol = ws.registry.volume(owner, req.volume)
            other = ws.registry.vm_on_volume(vol.key)
            if other is not None:
                raise RequestFailed(
                    ErrorCode.CONFLICT, f"volume {vol.name!r} is in use by VM {other.name!r}"
                )
            if any(m.name == req.name for m in ws.registry.vms(owner)):
                raise RequestFailed(ErrorCode.ALREADY_EXISTS, f"VM {req.name!r} already exists")
            ws.check_limits(owner, limits.Usage(vms=1, memory_mib=req.memory_mib))
            image = images.load_image(ws.images_dir, vol.image)
            memory_fd: int | None = None
            address: str | None = None
            if req.resume_snapshot is not None:
                snap = vol.snapshot(req.resume_snapshot)
                if snap.memory_file is None:
                    raise RequestFailed(
                        ErrorCode.CONFLICT,
                        f"snapshot {snap.name!r} has no saved memory to resume from",
                    )
                # The disk must be exactly as when the memory was saved.
                info = await ws.storage.rollback(vol.key, snap.name)
                ws.sync_snapshots(vol, info)
                memory_path = ws.memory_dir / snap.memory_file
                memory_fd = os.open(memory_path, os.O_RDONLY | os.O_CLOEXEC)
                address = snap.address
            attachment = await ws.storage.attachment(vol.key)
            rec = ws.registry.add_vm(owner, req.name, vol.key, req.vcpus, req.memory_mib)
            net: NetAttachmentInfo | None = None
            vhost_fd: int | None = None
            secret: bytes | None = None
            try:
                if self.use_vsock:
                    rec.cid = vsock.pick_cid(m.cid for m in ws.registry.vms() if m.cid)
                    secret = secrets.token_bytes(vsock.SECRET_BYTES)
                    rec.secret = secret.hex()
                    vhost_fd = os.open(vsock.VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC)
                if req.network is not None:
                    net = await self._net_attach(owner, rec.key, req.network, address)
                await self.engine.start(
                    VmConfig(
                        name=rec.key,
                        kernel=str(image.kernel),
                        initrd=str(image.initrd),
                        cmdline=image.manifest.cmdline,
                        disks=_disk_layers(attachment),
                        vcpus=req.vcpus,
                        memory_mib=req.memory_mib,
                        incoming_fd=memory_fd,
                        net=None if net is None else NetAttachment(tap_fd=net.tap_fd, mac=net.mac),
                        channel="vsock" if rec.cid is not None else "virtio-serial",
                        guest_cid=rec.cid,
                        vhost_vsock_fd=vhost_fd,
                        secret=secret,
                    )
                )
            except BaseException:
                ws.registry.remove_vm(rec.key)
                if net is not None:
                    with anyio.CancelScope(shield=True):
                        await self._net_detach(rec.key)
                raise
            finally:
                for fd in (memory_fd, vhost_fd, net.tap_fd if net is not None else None):
                    if fd is not None:
                        os.close(fd)  # QEMU holds its own copies
            ws.registry.save()
            channel = self._start_channel(rec.key)
        try:
            await channel.wait_ready(HELLO_TIMEOUT_S)
        except TimeoutError:
            st = self.engine.status(rec.key)
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                f"VM {req.name!r} did not say hello within {HELLO_TIMEOUT_S:.0f} s "
                f"(state {st.state}); console: {self._console(rec.key)[-1500:]}",
            ) from None
        await channel.call(gp.SetHostname(id=0, hostname=req.name), GUEST_CALL_TIMEOUT_S)
        if net is not None:
            await channel.call(
                gp.ConfigureNetwork(
                    id=0, mac=net.mac, address=net.address, prefix=net.prefix,
                    gateway=net.gateway, dns=list(net.dns),
                ),
                GUEST_CALL_TIMEOUT_S,
            )
        return self._info(req.id, rec)

    async def vm_stop(self, req: hp.VmStop, ctx: RequestContext) -> hp.Done:
        rec = self.ws.registry.vm(ctx.owner, req.name)
        channel = self._running.get(rec.key)

        async def agent_shutdown() -> None:
            # The agent answers, then syncs and powers off; the engine waits
            # for QEMU to end.  Without a channel, go straight to ACPI.
            if channel is None or not channel.channel.ready:
                raise RequestFailed(ErrorCode.UNAVAILABLE, "no guest channel")
            await channel.channel.call(gp.Shutdown(id=0), GUEST_CALL_TIMEOUT_S)

        if self._engine_state(rec.key) is not None:
            if req.force:
                await self.engine.kill(rec.key)
            else:
                t = max(req.timeout_s, 1.0)
                await self.engine.stop(
                    rec.key,
                    agent_shutdown=agent_shutdown,
                    agent_timeout=t,
                    powerdown_timeout=t / 2,
                )
            self.engine.forget(rec.key)
        self._stop_channel(rec.key)
        await self._net_detach(rec.key)
        async with self.ws.lock:
            self.ws.registry.remove_vm(rec.key)
            self.ws.registry.save()
        return hp.Done(id=req.id)

    # --- network ---------------------------------------------------------------------------

    def _policy(self, owner: int, wire: hp.NetworkPolicy) -> NetPolicy:
        """The wire policy with peer VM names turned into their keys."""
        raw = msgspec.to_builtins(wire)
        raw["peers"] = [self.ws.registry.vm(owner, name).key for name in wire.peers]
        # Groups are per owner: prefix them so two users' "dev" never meet.
        raw["groups"] = [f"u{owner}-{g}"[:63] for g in wire.groups]
        try:
            return msgspec.convert(raw, NetPolicy)
        except msgspec.ValidationError as exc:
            raise RequestFailed(ErrorCode.INVALID, f"network policy: {exc}") from None

    def _wire_policy(self, owner: int, policy: NetPolicy) -> hp.NetworkPolicy:
        raw = msgspec.to_builtins(policy)
        names = {m.key: m.name for m in self.ws.registry.vms(owner)}
        raw["peers"] = [names[k] for k in policy.peers if k in names]
        prefix = f"u{owner}-"
        raw["groups"] = [g[len(prefix):] for g in policy.groups if g.startswith(prefix)]
        return msgspec.convert(raw, hp.NetworkPolicy)

    def _need_net(self) -> NetworkManager:
        if self.net is None:
            raise RequestFailed(
                ErrorCode.UNAVAILABLE, "networking is not available on this helper (see its log)"
            )
        return self.net

    async def _net_attach(
        self, owner: int, key: str, wire: hp.NetworkPolicy, address: str | None = None
    ) -> NetAttachmentInfo:
        net = self._need_net()
        policy = self._policy(owner, wire)
        return await anyio.to_thread.run_sync(net.attach, key, owner, policy, address)

    async def _net_detach(self, key: str) -> None:
        if self.net is not None and key in self.net.state.workspaces:
            await anyio.to_thread.run_sync(self.net.detach, key)

    async def vm_network_set(self, req: hp.VmNetworkSet, ctx: RequestContext) -> hp.VmInfo:
        rec = self.ws.registry.vm(ctx.owner, req.name)
        net = self._need_net()
        if rec.key not in net.state.workspaces:
            raise RequestFailed(ErrorCode.CONFLICT, f"VM {req.name!r} has no network interface")
        policy = self._policy(ctx.owner, req.policy)
        await anyio.to_thread.run_sync(net.set_policy, rec.key, policy)
        return self._info(req.id, rec)

    async def forward_add(self, req: hp.ForwardAdd, ctx: RequestContext) -> hp.VmInfo:
        rec = self.ws.registry.vm(ctx.owner, req.vm)
        net = self._need_net()
        if rec.key not in net.state.workspaces:
            raise RequestFailed(ErrorCode.CONFLICT, f"VM {req.vm!r} has no network interface")
        fwd = Forward(host_port=req.host_port, guest_port=req.guest_port, protocol=req.protocol)
        await anyio.to_thread.run_sync(net.add_forward, rec.key, fwd)
        return self._info(req.id, rec)

    async def forward_remove(self, req: hp.ForwardRemove, ctx: RequestContext) -> hp.VmInfo:
        rec = self.ws.registry.vm(ctx.owner, req.vm)
        net = self._need_net()
        await anyio.to_thread.run_sync(net.remove_forward, rec.key, req.host_port, req.protocol)
        return self._info(req.id, rec)

    async def vm_get(self, req: hp.VmGet, ctx: RequestContext) -> hp.VmInfo:
        return self._info(req.id, self.ws.registry.vm(ctx.owner, req.name))

    async def vm_list(self, req: hp.VmList, ctx: RequestContext) -> hp.Vms:
        return hp.Vms(
            id=req.id, vms=[self._info(0, m) for m in self.ws.registry.vms(ctx.owner)]
        )

    async def vm_console(self, req: hp.VmConsole, ctx: RequestContext) -> hp.ConsoleText:
        rec = self.ws.registry.vm(ctx.owner, req.name)
        return hp.ConsoleText(id=req.id, text=self._console(rec.key, req.max_bytes))

    # --- snapshots of running VMs ------------------------------------------------------------

    async def snapshot_create(self, req: hp.SnapshotCreate, ctx: RequestContext) -> hp.VolumeInfo:
        ws = self.ws
        vol = ws.registry.volume(ctx.owner, req.volume)
        vm = ws.registry.vm_on_volume(vol.key)
        if vm is None:
            return await ws.snapshot_create(req, ctx)
        if any(s.name == req.snapshot for s in vol.snapshots):
            raise RequestFailed(
                ErrorCode.ALREADY_EXISTS,
                f"volume {req.volume!r} already has a snapshot {req.snapshot!r}",
            )
        channel = self._channel(vm)
        async with ws.lock:
            memory_file = await self._live_snapshot(vol, vm, channel, req.snapshot, req.memory)
            address = None
            if memory_file is not None and self.net is not None:
                ws_net = self.net.state.workspaces.get(vm.key)
                address = ws_net.address if ws_net is not None else None
            vol.snapshots.append(
                SnapshotRecord(
                    name=req.snapshot, created=time.time(), memory_file=memory_file,
                    address=address,
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
            log.error("vm_resume_failed", vm=key, error=str(exc))

    async def _thaw_quietly(self, channel: GuestChannel) -> None:
        try:
            await channel.call(gp.Thaw(id=0), GUEST_CALL_TIMEOUT_S)
        except (HelperError, TimeoutError) as exc:
            log.error("guest_thaw_failed", vm=channel.name, error=str(exc))

    # --- administration ------------------------------------------------------------------

    async def admin_list(self, req: hp.AdminList, ctx: RequestContext) -> hp.AdminListing:
        reg = self.ws.registry
        vols = [
            hp.AdminVolume(
                owner=v.owner, name=v.name, key=v.key, size_bytes=v.size_bytes,
                snapshots=[s.name for s in v.snapshots],
                vm=(m.name if (m := reg.vm_on_volume(v.key)) is not None else None),
            )
            for v in reg.volumes()
        ]
        vms = []
        for m in reg.vms():
            info = self._info(0, m)
            pid = qemu_uid = 0
            if self._engine_state(m.key) is not None:
                st = self.engine.status(m.key)
                pid, qemu_uid = st.pid, st.uid
            vms.append(hp.AdminVm(
                owner=m.owner, name=m.name, key=m.key, volume=info.volume, state=info.state,
                vcpus=m.vcpus, memory_mib=m.memory_mib, pid=pid, qemu_uid=qemu_uid,
            ))
        return hp.AdminListing(id=req.id, volumes=vols, vms=vms)

    async def gc(self, req: hp.Gc, ctx: RequestContext) -> hp.GcReport:
        """Find what no registry entry owns: QEMU processes, engine records,
        volumes, memory files; remove them unless ``dry_run``."""
        found: list[str] = []
        ws = self.ws
        async with ws.lock:
            vm_keys = {m.key for m in ws.registry.vms()}
            vol_keys = {v.key for v in ws.registry.volumes()}
            for orphan in self.engine.find_orphans():
                found.append(f"QEMU pid {orphan.pid} ({orphan.name}, uid {orphan.uid})")
                if not req.dry_run and self.engine.kill_orphan(orphan):
                    await _wait_gone(orphan.pid)  # it must let go of its volume
            for key in self.engine.names():
                if key in vm_keys:
                    continue
                found.append(f"VM {key} known to the engine but to no user")
                if not req.dry_run:
                    if self._engine_state(key) not in (VmState.STOPPED, VmState.CRASHED):
                        await self.engine.kill(key)
                    self.engine.forget(key)
            for vol in await ws.storage.list_volumes():
                if vol.name in vol_keys:
                    continue
                found.append(f"volume {vol.name} ({vol.used_bytes} bytes used) of no user")
                if not req.dry_run:
                    await ws.storage.destroy_volume(vol.name)
            wanted = {
                s.memory_file for v in ws.registry.volumes() for s in v.snapshots if s.memory_file
            }
            for f in sorted(self.ws.memory_dir.glob(f"*{MEMORY_FILE_SUFFIX}")):
                if f.name not in wanted:
                    found.append(f"memory file {f.name} of no snapshot")
                    if not req.dry_run:
                        f.unlink(missing_ok=True)
            if self.net is not None:
                net = self.net
                stale = [k for k in net.state.workspaces if k not in vm_keys]
                for k in stale:
                    found.append(f"network of {k} (address {net.state.workspaces[k].address})")
                if not req.dry_run:
                    report = await anyio.to_thread.run_sync(net.gc, vm_keys)
                    found += [f"network link {name}" for name in report.removed_links]
        log.info("gc", dry_run=req.dry_run, found=len(found))
        return hp.GcReport(id=req.id, dry_run=req.dry_run, orphans=[s[:4096] for s in found])

    # --- views ---------------------------------------------------------------------------

    def _console(self, key: str, nbytes: int = 64 * 1024) -> str:
        try:
            return self.engine.console_tail(key, nbytes).decode(errors="replace")
        except HelperError:
            return ""

    def _info(self, rid: int, rec: VmRecord) -> hp.VmInfo:
        vol = self.ws.registry.volume_by_key(rec.volume_key)
        try:
            st: VmStatus | None = self.engine.status(rec.key)
        except HelperError:
            st = None
        state = "crashed" if st is None else _STATE.get(st.state, "crashed")
        reason = ""
        if st is not None and st.state == VmState.CRASHED:
            reason = f"{st.exit_reason}; console: {(st.console_tail or '')[-2000:]}"
        elif st is None:
            reason = "QEMU is gone (it ended while the helper was not running)"
        return hp.VmInfo(
            id=rid,
            name=rec.name,
            volume=vol.name,
            state=state,  # type: ignore[arg-type]
            vcpus=rec.vcpus,
            memory_mib=rec.memory_mib,
            created=rec.created,
            accel=self.engine.record(rec.key).spec.accel.kind if st is not None else "",
            reason=reason[:4096],
            network=self._net_info(rec),
        )

    def _net_info(self, rec: VmRecord) -> hp.VmNetworkInfo | None:
        if self.net is None:
            return None
        ws = self.net.state.workspaces.get(rec.key)
        if ws is None:
            return None
        s = self.net.settings
        return hp.VmNetworkInfo(
            address=ws.address, prefix=s.prefixlen, gateway=str(s.gateway), mac=ws.mac,
            policy=self._wire_policy(rec.owner, ws.policy),
            forwards=[
                hp.ForwardInfo(host_port=f.host_port, guest_port=f.guest_port, protocol=f.protocol)
                for f in ws.forwards
            ],
        )


async def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` has exited (not our child: a pidfd tells)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.move_on_after(timeout):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


_STATE = {
    VmState.STARTING: "starting",
    VmState.RUNNING: "running",
    VmState.PAUSED: "running",
    VmState.STOPPING: "stopping",
    VmState.STOPPED: "stopped",
    VmState.CRASHED: "crashed",
}


def _disk_layers(att: Attachment) -> tuple[DiskLayer, ...]:
    return tuple(
        DiskLayer(format=n.format.value, path=str(n.path), read_only=n.read_only)
        for n in att.chain
    )
