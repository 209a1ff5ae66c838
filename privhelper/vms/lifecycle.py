"""VM life cycle requests: start, stop, get, list, console; opening a guest channel.

A VM runs on one of its owner's volumes.  It exists from ``VmStart`` until
``VmStop`` (a crashed VM stays, state ``crashed`` with its console tail, until
its owner stops it).  The engine knows it by the registry key.

``VmStart`` is all or nothing: every resource it takes (registry entry, CID,
TAP and rules, QEMU, guest channel) is pushed on an undo stack next to its
acquisition, and a failure at any later step (QEMU, the guest's hello, a
guest configuration step) undoes them all.  fds handed to QEMU are closed
once QEMU holds its copies, success or not.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import anyio
import structlog

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from .. import images, limits, vsock
from ..errors import HelperError, RequestFailed
from ..net.manager import Attachment as NetAttachmentInfo
from ..paging import page
from ..registry import VmRecord, VolumeRecord
from ..relay import GuestChannel
from ..server import RequestContext
from ..service import WorkspaceService
from ..storage import Attachment
from ..vm.engine import VmConfig, VmEngine, VmStatus
from ..vm.engine.types import FINISHED
from ..vm.spec import DiskLayer, NetAttachment
from .channels import GuestChannels, engine_state
from .forks import MACHINE_ID_PATH, ForkSource, fork_source, new_machine_id, reidentify_request
from .network import VmNetwork
from .views import VmViews

if TYPE_CHECKING:
    from .pool import WarmPool
    from .templates import Templates

log = structlog.get_logger("agentiso.helper.vms")

#: How long a started VM may take to say hello (TCG boots in ~3 s on 2 cores;
#: leave room for a loaded machine).
HELLO_TIMEOUT_S = 90.0
#: How often the hello wait looks whether QEMU still runs.
HELLO_POLL_S = 0.25
GUEST_CALL_TIMEOUT_S = 30.0

_T = TypeVar("_T")


def push_shielded(
    stack: AsyncExitStack, fn: Callable[..., Awaitable[Any]], *args: Any
) -> None:
    """Push an async undo step that runs to its end even when the request is cancelled."""

    async def undo() -> None:
        with anyio.CancelScope(shield=True):
            await fn(*args)

    stack.push_async_callback(undo)


@dataclass
class VmLifecycle:
    """Handles VmStart, VmStop, VmGet, VmList, VmConsole and GuestOpen.

    Registry changes and the checks they depend on (a name not yet taken, a
    volume not in use) happen under ``ws.lock``, the one lock that serialises
    the registry's mutations; waiting for a guest happens outside it.
    """

    HANDLES: ClassVar[dict[type[Any], str]] = {
        hp.VmStart: "vm_start",
        hp.VmStop: "vm_stop",
        hp.VmGet: "vm_get",
        hp.VmList: "vm_list",
        hp.VmConsole: "vm_console",
    }

    ws: WorkspaceService
    engine: VmEngine
    channels: GuestChannels
    network: VmNetwork
    views: VmViews
    #: Guest channel over vsock (where /dev/vhost-vsock exists), else virtio-serial.
    use_vsock: bool = field(default_factory=vsock.available)
    #: Boot templates (:mod:`.templates`): a fresh volume's start may resume one.
    templates: Templates | None = None
    #: The warm pool (:mod:`.pool`): a fresh volume's start may take a pool VM over.
    pool: WarmPool | None = None

    async def open_guest(self, req: hp.GuestOpen, ctx: RequestContext) -> GuestChannel:
        return self.channels.of_running(self.ws.registry.vm(ctx.owner, req.vm))

    async def adopt(self) -> None:
        """After a helper restart: re-attach to the VMs still running and
        bring their guest channels up again."""
        report = await self.engine.adopt_all()
        for name, why in report.unreadable.items():
            log.error("vm_record_unreadable", vm=name, error=why)
        known = {vm.key for vm in self.ws.registry.vms()}
        for key in report.adopted:
            if key in known:
                self.channels.start(key)
            else:
                log.warning("vm_not_in_registry", vm=key, hint="agentiso-helper gc")
        for st in report.dead:
            log.warning("vm_died_while_helper_was_away", vm=st.name, reason=st.exit_reason)
        log.info("adopted", vms=len(report.adopted), dead=len(report.dead))

    # --- start -----------------------------------------------------------------------------

    def check_start(self, owner: int, req: hp.VmStart) -> VolumeRecord:
        """``owner``'s volume that ``req`` starts on, once every check a start
        makes before it takes anything has passed (the volume is free, the
        name is new, the limits allow it).  The caller holds ``ws.lock``."""
        ws = self.ws
        vol = ws.registry.volume(owner, req.volume)
        other = ws.registry.vm_on_volume(vol.key)
        if other is not None:
            raise RequestFailed(
                ErrorCode.CONFLICT, f"volume {vol.name!r} is in use by VM {other.name!r}"
            )
        if any(m.name == req.name for m in ws.registry.vms(owner)):
            raise RequestFailed(ErrorCode.ALREADY_EXISTS, f"VM {req.name!r} already exists")
        ws.check_limits(owner, limits.Usage(vms=1, memory_mib=req.memory_mib))
        return vol

    async def vm_start(self, req: hp.VmStart, ctx: RequestContext) -> hp.VmInfo:
        if self.pool is not None and (taken := await self.pool.claim(req, ctx)) is not None:
            return taken  # a warm pool VM, taken over (pool.py)
        owner = ctx.owner
        ws = self.ws
        # QEMU holds its own copies of the fds once it runs (``fds``).
        async with AsyncExitStack() as undo:
            with ExitStack() as fds:
                async with ws.lock:  # checks and registrations; QEMU starts after it
                    vol = self.check_start(owner, req)
                    image = images.load_image(ws.images_dir, vol.image)
                    memory_fd: int | None = None
                    address: str | None = None
                    fork: ForkSource | None = None
                    saved_secret: str | None = None
                    if req.resume_from is not None:  # a new address comes from the pool
                        fork = fork_source(ws.registry, owner, vol, req)
                        memory_fd = _open_fd(fds, ws.memory_dir / fork.memory_file, os.O_RDONLY)
                        saved_secret = fork.secret
                    elif self.templates is not None and (
                        fork := await self.templates.claim(vol, req)
                    ) is not None:  # a template's memory, with a new identity as a fork
                        memory_fd = _open_fd(fds, ws.memory_dir / fork.memory_file, os.O_RDONLY)
                        saved_secret = fork.secret
                    elif req.resume_snapshot is not None:
                        snap = vol.snapshot(req.resume_snapshot)
                        if snap.memory_file is None:
                            raise RequestFailed(
                                ErrorCode.CONFLICT,
                                f"snapshot {snap.name!r} has no saved memory to resume from",
                            )
                        # The disk must be exactly as when the memory was saved.
                        info = await ws.storage.rollback(vol.key, snap.name)
                        ws.sync_snapshots(vol, info)
                        memory_fd = _open_fd(fds, ws.memory_dir / snap.memory_file, os.O_RDONLY)
                        address = snap.address
                        saved_secret = snap.secret
                    # A template's VM being built, or a clone of a template whose
                    # RAM is shared: the guest RAM is a file (templates.py).
                    ram = None if self.templates is None else self.templates.ram_for(
                        vol, claimed=fork is not None and req.resume_from is None)
                    if ram is not None and not ram[1]:  # a clone's: our duplicate
                        fds.callback(os.close, ram[0])
                    attachment = await ws.storage.attachment(vol.key)

                    # From here the name and the volume are taken for everyone
                    # else, even while QEMU starts with the lock released.
                    rec = ws.registry.add_vm(owner, req.name, vol.key, req.vcpus, req.memory_mib)
                    # Saved with the record, so a helper restart keeps them; the
                    # timer leaves a VM alone until its VmStart is over.
                    rec.time_limits = req.time_limits
                    push_shielded(undo, self._unregister, rec.key)
                    vhost_fd: int | None = None
                    secret: bytes | None = None
                    if self.use_vsock:
                        rec.cid = vsock.pick_cid(m.cid for m in ws.registry.vms() if m.cid)
                        secret = vsock.secret_for(saved_secret)
                        rec.secret = secret.hex()
                        vhost_fd = _open_fd(fds, vsock.VHOST_VSOCK, os.O_RDWR)
                    net: NetAttachmentInfo | None = None
                    if req.network is not None:
                        net = await self.network.attach(owner, rec.key, req.network, address)
                        fds.callback(os.close, net.tap_fd)
                        push_shielded(undo, self.network.detach, rec.key)
                tap = None if net is None else NetAttachment(tap_fd=net.tap_fd, mac=net.mac)
                # Pushed before the start: a start that fails after QEMU was
                # spawned (its record unsaved on a full disk, say) leaves a
                # QEMU the engine knows; it must not outlive us.
                push_shielded(undo, self._discard_qemu, rec.key)
                # QEMU's start (a memory restore included) waits on QEMU: no
                # lock is held, so other users' requests go on meanwhile.
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
                        net=tap,
                        channel="vsock" if rec.cid is not None else "virtio-serial",
                        guest_cid=rec.cid,
                        vhost_vsock_fd=vhost_fd,
                        secret=secret,
                        net_link_down=fork is not None,
                        memory_fd=None if ram is None else ram[0],
                        memory_shared=ram is not None and ram[1],
                    )
                )
            async with ws.lock:
                # A guest ran on it: its disk is no longer the snapshot's.
                vol.pristine_clone_of = None
                ws.registry.save()
            channel = self.channels.start(rec.key)
            undo.callback(self.channels.stop, rec.key)
            machine_id: str | None
            if fork is not None and net is not None:
                machine_id = await self._reidentify(req, rec.key, channel, net, fork)
            else:
                machine_id = await self._configure_guest(
                    req, rec.key, channel, net, give_machine_id=vol.machine_id is None
                )
            if machine_id is not None:
                async with ws.lock:
                    vol.machine_id = machine_id
                    ws.registry.save()
            undo.pop_all()  # it all stays
        return self.views.info(req.id, rec)

    async def _configure_guest(
        self, req: hp.VmStart, key: str, channel: GuestChannel, net: NetAttachmentInfo | None,
        *, give_machine_id: bool = False,
    ) -> str | None:
        """Wait for the agent's hello, then set the guest's hostname and address;
        with ``give_machine_id`` (the volume's first boot: a new machine) write
        a new /etc/machine-id and return it.

        A step the guest refuses raises GuestStepFailed (``guest_failed``)."""
        await self._wait_hello(req, key, channel)
        await self.guest_step(
            req, key, channel, gp.SetHostname(id=0, hostname=req.name)
        )
        machine_id = None
        if give_machine_id:
            machine_id = new_machine_id()
            await self.guest_step(
                req, key, channel,
                gp.FileWrite(id=0, path=MACHINE_ID_PATH, data=f"{machine_id}\n".encode(),
                             perm=0o444),
            )
        if net is not None:
            await self.guest_step(
                req, key, channel,
                gp.ConfigureNetwork(
                    id=0, mac=net.mac, address=net.address, prefix=net.prefix,
                    gateway=net.gateway, dns=list(net.dns),
                ),
            )
        return machine_id

    async def _reidentify(
        self, req: hp.VmStart, key: str, channel: GuestChannel, net: NetAttachmentInfo,
        fork: ForkSource,
    ) -> str:
        """A fork's agent takes its new identity while the link is down; then
        the link comes up (see :mod:`.forks`).  Returns the new machine-id."""
        await self._wait_hello(req, key, channel)
        identity = reidentify_request(req.name, net, fork.old_mac)
        await self.guest_step(req, key, channel, identity)
        await self.engine.set_link(key, True)
        return identity.machine_id

    async def _wait_hello(self, req: hp.VmStart, key: str, channel: GuestChannel) -> None:
        """Wait for the agent's hello (see :meth:`_while_answerable`)."""
        try:
            await self._while_answerable(req, key, lambda: channel.wait_ready(HELLO_TIMEOUT_S))
        except TimeoutError:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                f"VM {req.name!r} did not say hello within {HELLO_TIMEOUT_S:.0f} s "
                f"(state {engine_state(self.engine, key)}); "
                f"console: {self.views.console(key)[-1500:]}",
            ) from None

    async def guest_step(
        self, req: hp.VmStart, key: str, channel: GuestChannel, msg: Any
    ) -> Any:
        """One configuration request to the agent during a start (or a warm
        pool VM's take-over), failed at once if the guest cannot answer."""
        return await self._while_answerable(
            req, key, lambda: channel.call(msg, GUEST_CALL_TIMEOUT_S)
        )

    async def _while_answerable(
        self, req: hp.VmStart, key: str, step: Callable[[], Awaitable[_T]]
    ) -> _T:
        """Run one guest step of a start, but only while the guest can answer.

        A guest that powers off or crashes during boot, or that QEMU paused on
        a disk error (the host filesystem full), fails the start within
        :data:`HELLO_POLL_S`, saying why, instead of after the step's timeout.
        """
        failure: RequestFailed | None = None
        error: Exception | None = None
        done: list[_T] = []
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal failure
                while failure is None:
                    await anyio.sleep(HELLO_POLL_S)
                    failure = self._why_unanswerable(req, key)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                done.append(await step())
            except Exception as exc:  # raised as it is, not in an ExceptionGroup
                error = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if error is not None:
            raise error
        return done[0]

    def _why_unanswerable(self, req: hp.VmStart, key: str) -> RequestFailed | None:
        """Why VM ``key``'s guest cannot answer now (None: it may)."""
        try:
            st: VmStatus | None = self.engine.status(key)
        except HelperError:
            st = None
        if st is None or st.state in FINISHED:
            return RequestFailed(
                ErrorCode.GUEST_FAILED,
                f"VM {req.name!r} ended during boot ({st.state if st else 'gone'}) before its "
                f"agent was configured; console: {self.views.console(key)[-1500:]}",
            )
        if st.io_error is not None:
            return RequestFailed(
                ErrorCode.UNAVAILABLE,
                f"VM {req.name!r} was paused by QEMU during boot: {st.io_error}. "
                "Free space on the helper's state filesystem, then start it again.",
            )
        return None

    async def _unregister(self, key: str) -> None:
        async with self.ws.lock:
            self.ws.registry.remove_vm(key)
            self.ws.registry.save()

    async def _discard_qemu(self, key: str) -> None:
        """Kill and forget QEMU of a VM whose start failed after it was spawned."""
        if engine_state(self.engine, key) is not None:
            await self.engine.kill(key)
            self.engine.forget(key)

    # --- stop ------------------------------------------------------------------------------

    async def vm_stop(self, req: hp.VmStop, ctx: RequestContext) -> hp.Done:
        rec = self.ws.registry.vm(ctx.owner, req.name)
        await self.stop_vm(rec, req.timeout_s, req.force)
        return hp.Done(id=req.id)

    async def stop_vm(self, rec: VmRecord, timeout_s: float, force: bool = False) -> None:
        """Stop VM ``rec`` and release all it holds (QEMU, channel, TAP and
        rules, registry entry); ``VmStop``'s path, also taken by a time limit."""
        channel = self.channels.get(rec.key)

        async def agent_shutdown() -> None:
            # The agent answers, then syncs and powers off; the engine waits
            # for QEMU to end.  Without a channel, go straight to ACPI.
            if channel is None or not channel.ready:
                raise RequestFailed(ErrorCode.UNAVAILABLE, "no guest channel")
            await channel.call(gp.Shutdown(id=0), GUEST_CALL_TIMEOUT_S)

        if engine_state(self.engine, rec.key) is not None:
            if force:
                await self.engine.kill(rec.key)
            else:
                t = max(timeout_s, 1.0)
                await self.engine.stop(
                    rec.key,
                    agent_shutdown=agent_shutdown,
                    agent_timeout=t,
                    powerdown_timeout=t / 2,
                )
            self.engine.forget(rec.key)
        self.channels.stop(rec.key)
        await self.network.detach(rec.key)
        await self._unregister(rec.key)

    # --- views -----------------------------------------------------------------------------

    async def vm_get(self, req: hp.VmGet, ctx: RequestContext) -> hp.VmInfo:
        return self.views.info(req.id, self.ws.registry.vm(ctx.owner, req.name))

    async def vm_list(self, req: hp.VmList, ctx: RequestContext) -> hp.Vms:
        infos = [self.views.info(0, m) for m in self.ws.registry.vms(ctx.owner)]
        vms, next_cursor = page(infos, req.cursor)
        return hp.Vms(id=req.id, vms=vms, next_cursor=next_cursor)

    async def vm_console(self, req: hp.VmConsole, ctx: RequestContext) -> hp.ConsoleText:
        rec = self.ws.registry.vm(ctx.owner, req.name)
        return hp.ConsoleText(id=req.id, text=self.views.console(rec.key, req.max_bytes))


def _open_fd(fds: ExitStack, path: object, flags: int) -> int:
    fd = os.open(str(path), flags | os.O_CLOEXEC)
    fds.callback(os.close, fd)
    return fd


def _disk_layers(att: Attachment) -> tuple[DiskLayer, ...]:
    return tuple(
        DiskLayer(format=n.format.value, path=str(n.path), read_only=n.read_only)
        for n in att.chain
    )
