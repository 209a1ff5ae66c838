"""Workspace orchestration: the catalog's rows and the helper's resources, in step.

A workspace is a catalog row (name, shape, state, env defaults, owning
session) plus what the helper holds for it under the row's id: a volume and,
while it runs, a VM (the helper is the truth about those).  Every operation
here:

* checks the row's state with :func:`lifecycle.require` and claims it with a
  compare-and-set in the catalog, so two frontends never act on one workspace
  at once;
* undoes each step it made if a later one fails (or the call is cancelled),
  so nothing half-made survives: no volume, VM, TAP, address or row;
* never holds a lock across a wait on the helper or a guest.

Connections: one helper connection and one guest channel per running
workspace are kept open (:class:`~.keepopen.KeptOpen`) and reopened after a
loss.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc
import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import Conflict, InvalidRequest, NotFound

from . import lifecycle, quotas
from .catalog import Catalog, WorkspaceRecord, validate_workspace_name
from .config import FrontendConfig
from .errors import ConnectionLost, FrontendError
from .guest_channel import open_guest
from .guest_client import GuestClient
from .helper_client import HelperClient, connect_helper
from .keepopen import KeptOpen
from .lifecycle import Event, Operation, State
from .sessions import Session, session_alive
from .workspace_errors import WorkspaceError

log = structlog.get_logger("agentiso.frontend.workspaces")

GiB = 1024 * 1024 * 1024
#: How long a graceful stop may take before the helper kills the VM.
STOP_TIMEOUT_S = 30.0
Progress = Callable[[str], Awaitable[None]]
Protocol = Literal["tcp", "udp"]
#: Host ports a forward gets when the caller names none.
FORWARD_PORTS = (20000, 45000)


class NotYours(WorkspaceError):
    def __init__(self, name: str, owner_alive: bool) -> None:
        whose = "another agentiso session that is still running" if owner_alive else \
            "an agentiso session that has ended"
        super().__init__(
            f"workspace {name!r} belongs to {whose}",
            "Adopt it with workspace_adopt (workspace_adopt_all takes every workspace "
            "whose session ended), then retry",
        )


class NoSuchImage(WorkspaceError):
    def __init__(self, image: str, available: list[str]) -> None:
        super().__init__(
            f"no guest image named {image!r} on this host",
            f"Use one of: {', '.join(available) or '(none installed)'}; an administrator "
            f"builds more with `make image IMAGE=<name>`",
        )


class NetworkError(WorkspaceError):
    pass


async def _no_progress(_: str) -> None:
    return None


@dataclass(frozen=True)
class Detail:
    """A workspace as the tools show it: the row, and the helper's view."""

    record: WorkspaceRecord
    vm: hp.VmInfo | None
    volume: hp.VolumeInfo | None


@dataclass(frozen=True)
class Orphan:
    """A helper resource of ours that no catalog row claims."""

    kind: str  # "vm" or "volume"
    name: str
    state: str


class Workspaces:
    """The orchestrator the MCP tools call.  Create it inside a task group."""

    def __init__(
        self, config: FrontendConfig, catalog: Catalog, session: Session,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.session = session
        self._tg = tg
        self._helper: KeptOpen[HelperClient] = KeptOpen(
            tg, lambda: connect_helper(config.helper_socket, client_name="agentiso-serve"),
            "helper connection",
        )
        self._guests: dict[str, KeptOpen[GuestClient]] = {}

    # --- connections -----------------------------------------------------------------

    async def helper(self) -> HelperClient:
        """The kept helper connection (raises HelperUnavailable with how to start it)."""
        return await self._helper.get()

    @asynccontextmanager
    async def helper_call(self) -> AsyncIterator[HelperClient]:
        """A block that uses the helper: a lost connection is dropped so the
        next call reconnects."""
        client = await self.helper()
        try:
            yield client
        except ConnectionLost:
            self._helper.invalidate(client)
            raise

    @asynccontextmanager
    async def guest(self, rec: WorkspaceRecord) -> AsyncIterator[GuestClient]:
        """The guest agent of a running workspace (kept open between calls)."""
        lifecycle.require(rec.name, rec.state, Operation.EXEC)
        kept = self._guests.get(rec.vm)
        if kept is None:
            sock = self.config.helper_socket
            timeout = float(self.config.limits.boot_timeout_secs)
            kept = self._guests[rec.vm] = KeptOpen(
                self._tg, lambda: open_guest(sock, rec.vm, timeout=timeout),
                f"guest channel of {rec.name}",
            )
        client = await kept.get()
        try:
            yield client
        except ConnectionLost:
            kept.invalidate(client)
            raise

    def _drop_guest(self, vm: str) -> None:
        kept = self._guests.pop(vm, None)
        if kept is not None:
            kept.close()

    def get(self, ref: str) -> WorkspaceRecord:
        """Any workspace of this user (read-only tools)."""
        return self.catalog.get_workspace(ref)

    def owned(self, ref: str) -> WorkspaceRecord:
        """A workspace of this session: what every tool that uses or changes one
        requires.  Another session's must be adopted first."""
        rec = self.catalog.get_workspace(ref)
        if rec.session != self.session.id:
            alive = bool(rec.session) and session_alive(self.config.state_dir, str(rec.session))
            raise NotYours(rec.name, alive)
        return rec

    def adopt(self, ref: str) -> WorkspaceRecord:
        """Make this session the owner of a workspace (even one whose session
        still runs: an explicit take-over)."""
        rec = self.catalog.get_workspace(ref)
        adopted = self.catalog.adopt(rec.id, self.session.id)
        return adopted if adopted is not None else self.catalog.get_workspace(rec.id)

    def adopt_all(self) -> list[WorkspaceRecord]:
        """Adopt every workspace whose session has ended."""
        taken = []
        for rec in self.catalog.list_workspaces():
            if rec.session == self.session.id:
                continue
            got = self.catalog.adopt(
                rec.id, self.session.id,
                unless_alive=lambda s: session_alive(self.config.state_dir, s),
            )
            if got is not None:
                taken.append(got)
        return taken

    # --- create ----------------------------------------------------------------------

    async def create(
        self, *, name: str | None, image: str, vcpus: int, memory_mb: int,
        disk_gb: int | None, allow_internet: bool, progress: Progress = _no_progress,
    ) -> Detail:
        """Volume from the image, VM with its network, agent hello, guest
        configured (by the helper), then the row says running.  Any failure
        or cancellation undoes every step, the row included."""
        name = validate_workspace_name(name) if name else self._auto_name(image)
        async with self.helper_call() as h:
            images = {i.name: i for i in (await h.image_list()).images}
        if image not in images:
            raise NoSuchImage(image, sorted(images))
        image_gb = max(1, -(-images[image].size_bytes // GiB))
        ask = quotas.Ask(workspaces=1, vcpus=vcpus, memory_mb=memory_mb,
                         disk_gb=disk_gb or image_gb)
        wid = self.catalog.new_workspace_id()
        now = time.time()
        rec = WorkspaceRecord(
            id=wid, name=name, image=image, vcpus=vcpus, memory_mb=memory_mb,
            disk_gb=disk_gb, allow_internet=allow_internet, state=State.CREATING,
            state_reason="", vm=wid, volume=wid, session=self.session.id,
            created_at=now, updated_at=now, env={}, parent_workspace=None,
            parent_snapshot=None,
        )
        self.catalog.add_workspace(rec, check=lambda rows: quotas.check(
            self.config.quotas, rows, self.session.id, ask, default_disk_gb=image_gb))
        async with AsyncExitStack() as undo:
            undo.push_async_callback(self._forget_row, wid)
            async with self.helper_call() as h:
                await progress("creating the disk from image " + image)
                await h.volume_create(
                    name=wid, source=hp.FromImage(image=image),
                    size_bytes=disk_gb * GiB if disk_gb else None,
                )
                undo.push_async_callback(self._destroy_volume, wid)
                await progress("booting the VM")
                # Pushed first: a boot that times out may leave the VM registered.
                undo.push_async_callback(self._kill_vm, wid)
                # Runs first on failure: a crash during the undo leaves a row
                # that the next start-up finishes as a destroy.
                undo.push_async_callback(self._mark, wid, Event.CREATE_FAILED)
                vm = await h.vm_start(
                    name=wid, volume=wid, vcpus=vcpus, memory_mib=memory_mb,
                    network=self._policy(rec),
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
            await progress("connecting to the guest agent")
            async with self.guest(self._advance(rec, Event.CREATED)) as g:
                await g.ping()
            undo.pop_all()  # success: keep everything
        return Detail(self.catalog.get_workspace(wid), vm, None)

    def _auto_name(self, image: str) -> str:
        for _ in range(20):
            name = f"{image[:50]}-{secrets.token_hex(2)}"
            if self.catalog.find_workspace(name) is None:
                return name
        return f"{image[:40]}-{secrets.token_hex(6)}"

    # --- undo steps (shielded: they run while a failure or cancellation unwinds) ------

    async def _forget_row(self, wid: str) -> None:
        self._drop_guest(wid)
        self.catalog.delete_workspace(wid)

    async def _destroy_volume(self, volume: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                async with self.helper_call() as h:
                    await h.volume_destroy(name=volume)
            except NotFound:
                pass
            except Exception as exc:
                log.warning("undo_failed", step="volume_destroy", volume=volume, error=str(exc))

    async def _kill_vm(self, vm: str) -> None:
        with anyio.CancelScope(shield=True):
            self._drop_guest(vm)
            try:
                async with self.helper_call() as h:
                    await h.vm_stop(name=vm, force=True)
            except NotFound:
                pass
            except Exception as exc:
                log.warning("undo_failed", step="vm_stop", vm=vm, error=str(exc))

    # --- start / stop / destroy ------------------------------------------------------

    def _advance(self, rec: WorkspaceRecord, event: Event, reason: str = "") -> WorkspaceRecord:
        """Move the row by ``event`` from the state it was read in (compare-and-set:
        raises StateConflict if another operation moved it meanwhile)."""
        new = lifecycle.transition(rec.state, event)
        return self.catalog.set_state(rec.id, new, reason, expect=[rec.state])

    async def _mark(self, wid: str, event: Event) -> None:
        rec = self.catalog.find_workspace(wid)
        if rec is not None:
            self.catalog.set_state(wid, lifecycle.transition(rec.state, event), str(event))

    async def start(self, ref: str, progress: Progress = _no_progress) -> Detail:
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.START)
        quotas.check(self.config.quotas, self.catalog.list_workspaces(), self.session.id,
                     quotas.Ask(workspaces=0, vcpus=rec.vcpus, memory_mb=rec.memory_mb,
                                disk_gb=0), exclude=rec.id)
        rec = self._advance(rec, Event.START_REQUESTED)
        try:
            # A crashed VM stays registered until stopped: clear it first.
            await self._kill_vm(rec.vm)
            await progress("booting the VM")
            async with self.helper_call() as h:
                vm = await h.vm_start(
                    name=rec.vm, volume=rec.volume, vcpus=rec.vcpus, memory_mib=rec.memory_mb,
                    network=self._policy(rec),
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
                vm = await self._restore_forwards(h, rec, vm)
            await progress("connecting to the guest agent")
            rec = self._advance(rec, Event.STARTED)
            async with self.guest(rec) as g:
                await g.ping()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._kill_vm(rec.vm)
                rec = self.catalog.get_workspace(rec.id)
                event = Event.START_FAILED if rec.state is State.STARTING else Event.VANISHED
                self._advance(rec, event, f"start failed: {_reason(exc)}")
            raise
        return Detail(rec, vm, None)

    async def stop(self, ref: str, *, force: bool = False) -> WorkspaceRecord:
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.STOP)
        rec = self._advance(rec, Event.STOP_REQUESTED)
        self._drop_guest(rec.vm)
        try:
            async with self.helper_call() as h:
                await h.vm_stop(name=rec.vm, force=force, timeout_s=STOP_TIMEOUT_S,
                                timeout=STOP_TIMEOUT_S + 30)
        except NotFound:
            pass  # already gone: stopped is what we wanted
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                rec = self._advance(rec, Event.STOP_FAILED, f"stop failed: {_reason(exc)}")
                await self._settle(rec)
            raise
        return self._advance(rec, Event.STOPPED, "stopped by request")

    async def destroy(self, ref: str) -> WorkspaceRecord:
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.DESTROY)
        rec = self._advance(rec, Event.DESTROY_REQUESTED)
        try:
            await self._remove_resources(rec, strict=True)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                rec = self._advance(rec, Event.DESTROY_FAILED, f"destroy failed: {_reason(exc)}")
                await self._settle(rec)
            raise
        self.catalog.delete_workspace(rec.id)
        return rec

    async def _remove_resources(self, rec: WorkspaceRecord, *, strict: bool) -> None:
        """Stop the VM (killing it) and destroy the volume; what is already gone
        is fine.  ``strict``: other failures are raised (else logged)."""
        self._drop_guest(rec.vm)
        try:
            async with self.helper_call() as h:
                try:
                    await h.vm_stop(name=rec.vm, force=True)
                except NotFound:
                    pass
                try:
                    await h.volume_destroy(name=rec.volume)
                except NotFound:
                    pass
        except Exception as exc:
            if strict:
                raise
            log.warning("cleanup_failed", workspace=rec.name, error=str(exc))

    async def _settle(self, rec: WorkspaceRecord) -> None:
        """After a failed stop/destroy: make the row say what the helper holds."""
        try:
            async with self.helper_call() as h:
                vm: hp.VmInfo | None = await h.vm_get(name=rec.vm)
        except NotFound:
            vm = None
        except Exception:
            return  # unknown: leave it for the next reconcile
        state, reason = lifecycle.reconcile(rec.state, None if vm is None else vm.state)
        if state is not rec.state:
            self.catalog.set_state(rec.id, state, reason, expect=[rec.state])

    # --- views -----------------------------------------------------------------------

    async def detail(self, ref: str) -> Detail:
        rec = self.get(ref)
        vm: hp.VmInfo | None = None
        vol: hp.VolumeInfo | None = None
        async with self.helper_call() as h:
            try:
                vm = await h.vm_get(name=rec.vm)
            except NotFound:
                vm = None
            try:
                vol = await h.volume_get(name=rec.volume)
            except NotFound:
                vol = None
        rec = self._reconciled(rec, vm)
        return Detail(rec, vm, vol)

    async def list_all(self) -> tuple[list[Detail], list[Orphan]]:
        """Every workspace of this user (reconciled with the helper) and the
        helper's resources no row claims (shown, never hidden)."""
        async with self.helper_call() as h:
            vms = {v.name: v for v in (await h.vm_list()).vms}
            vols = {v.name: v for v in (await h.volume_list()).volumes}
        out = []
        claimed_vms: set[str] = set()
        claimed_vols: set[str] = set()
        for rec in self.catalog.list_workspaces():
            claimed_vms.add(rec.vm)
            claimed_vols.add(rec.volume)
            vm = vms.get(rec.vm)
            out.append(Detail(self._reconciled(rec, vm), vm, vols.get(rec.volume)))
        orphans = [Orphan("vm", n, v.state) for n, v in vms.items() if n not in claimed_vms]
        orphans += [Orphan("volume", n, "in use" if v.vm else "idle")
                    for n, v in vols.items() if n not in claimed_vols]
        return out, orphans

    def _reconciled(self, rec: WorkspaceRecord, vm: hp.VmInfo | None) -> WorkspaceRecord:
        """The row, corrected where the helper contradicts it (e.g. a VM that died)."""
        if rec.state in lifecycle.BUSY_STATES:
            return rec  # an operation is under way (or its frontend died: see reconcile_all)
        state, reason = lifecycle.reconcile(rec.state, None if vm is None else vm.state)
        if state == rec.state:
            return rec
        if state != State.RUNNING:
            self._drop_guest(rec.vm)
        if vm is not None and vm.reason:
            reason = f"{reason}: {vm.reason}"
        try:
            return self.catalog.set_state(rec.id, state, reason, expect=[rec.state])
        except FrontendError:
            return self.catalog.get_workspace(rec.id)

    async def reconcile_all(self) -> None:
        """On start: rows left mid-operation by a frontend that is gone are
        finished (a half-made create is undone; a destroy is completed), and
        every other row is corrected from the helper's view."""
        for rec in self.catalog.list_workspaces():
            if rec.state not in lifecycle.BUSY_STATES:
                continue
            if rec.session and session_alive(self.config.state_dir, rec.session):
                continue
            try:
                async with self.helper_call() as h:
                    vm_state: str | None = (await h.vm_get(name=rec.vm)).state
            except NotFound:
                vm_state = None
            state, reason = lifecycle.recover(rec.state, vm_state)
            log.info("recover_abandoned", workspace=rec.name, was=str(rec.state), now=str(state))
            try:
                rec = self.catalog.set_state(rec.id, state, reason, expect=[rec.state])
            except FrontendError:
                continue  # someone else is recovering it
            if state is State.DESTROYING:
                await self._remove_resources(rec, strict=False)
                self.catalog.delete_workspace(rec.id)
        await self.list_all()

    # --- network ----------------------------------------------------------------------

    def _policy(self, rec: WorkspaceRecord) -> hp.NetworkPolicy:
        """The helper policy of a workspace: internet, allow-list, groups, and
        the peers that have a VM now (a stopped peer has no address to allow)."""
        net = rec.network
        peers = []
        for name in net.get("peers", []):
            peer = self.catalog.find_workspace(name)
            if peer is not None and peer.state is State.RUNNING:
                peers.append(peer.vm)
        return hp.NetworkPolicy(
            egress=rec.allow_internet,
            allow=[hp.AllowRule(cidr=a["cidr"], protocol=a.get("protocol", "any"),
                                ports=[hp.PortRange(first=p[0], last=p[1])
                                       for p in a.get("ports", [])])
                   for a in net.get("allow", [])],
            peers=peers,
            groups=list(net.get("groups", [])),
        )

    async def set_network(
        self, ref: str, *, allow_internet: bool | None, allow: list[dict[str, Any]] | None,
        peers: list[str] | None, groups: list[str] | None,
    ) -> tuple[WorkspaceRecord, hp.VmInfo | None]:
        """Change what a workspace may reach; applied at once (atomically) if it runs."""
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.NETWORK)
        net = dict(rec.network)
        if allow is not None:
            net["allow"] = allow
        if peers is not None:
            for p in peers:
                if self.catalog.get_workspace(p).id == rec.id:
                    raise NetworkError(f"workspace {rec.name!r} cannot peer with itself",
                                       "Name other workspaces of yours in peers.")
            net["peers"] = [self.catalog.get_workspace(p).name for p in peers]
        if groups is not None:
            net["groups"] = groups
        changes: dict[str, Any] = {"network": net}
        if allow_internet is not None:
            changes["allow_internet"] = allow_internet
        new = self.catalog.update_workspace(rec.id, **changes)
        vm = None
        if new.state is State.RUNNING:
            try:
                async with self.helper_call() as h:
                    vm = await h.vm_network_set(name=new.vm, policy=self._policy(new))
            except BaseException:
                # Not applied: the catalog goes back to what the VM still has.
                self.catalog.update_workspace(rec.id, network=rec.network,
                                              allow_internet=rec.allow_internet)
                raise
            await self._refresh_peers_of(new)
        return new, vm

    async def _refresh_peers_of(self, rec: WorkspaceRecord) -> None:
        """Re-apply the policies of running workspaces that name ``rec`` as a peer
        (their policy could not include it while it had no VM)."""
        for other in self.catalog.list_workspaces():
            if other.id != rec.id and other.state is State.RUNNING and \
                    rec.name in other.network.get("peers", []):
                try:
                    async with self.helper_call() as h:
                        await h.vm_network_set(name=other.vm, policy=self._policy(other))
                except Exception as exc:
                    log.warning("peer_refresh_failed", workspace=other.name, error=str(exc))

    async def forward_add(self, ref: str, *, guest_port: int, host_port: int | None,
                          protocol: Protocol) -> tuple[WorkspaceRecord, int]:
        """Forward a host port (chosen if None) to ``guest_port``; kept across restarts."""
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.NETWORK)
        tries = [host_port] if host_port else [
            FORWARD_PORTS[0] + secrets.randbelow(FORWARD_PORTS[1] - FORWARD_PORTS[0])
            for _ in range(20)]
        last: Exception | None = None
        for port in tries:
            try:
                async with self.helper_call() as h:
                    await h.forward_add(vm=rec.vm, host_port=port, guest_port=guest_port,
                                        protocol=protocol)
            except Conflict as exc:
                last = exc
                if host_port:
                    raise
                continue
            fwd = {"host_port": port, "guest_port": guest_port, "protocol": protocol}
            net = dict(rec.network)
            net["forwards"] = [*net.get("forwards", []), fwd]
            return self.catalog.update_workspace(rec.id, network=net), port
        raise NetworkError(f"no free host port found for the forward ({last})",
                           "Give host_port explicitly.")

    async def forward_remove(self, ref: str, *, host_port: int,
                             protocol: Protocol) -> WorkspaceRecord:
        rec = self.owned(ref)
        net = dict(rec.network)
        kept = [f for f in net.get("forwards", [])
                if (f["host_port"], f["protocol"]) != (host_port, protocol)]
        if len(kept) == len(net.get("forwards", [])):
            raise NetworkError(f"workspace {rec.name!r} has no {protocol} forward from host "
                               f"port {host_port}", "See its forwards with workspace_info.")
        if rec.state is State.RUNNING:
            try:
                async with self.helper_call() as h:
                    await h.forward_remove(vm=rec.vm, host_port=host_port, protocol=protocol)
            except NotFound:
                pass
        net["forwards"] = kept
        return self.catalog.update_workspace(rec.id, network=net)

    async def _restore_forwards(self, h: HelperClient, rec: WorkspaceRecord,
                                vm: hp.VmInfo) -> hp.VmInfo:
        """After a start: put the workspace's forwards back (a port taken
        meanwhile is dropped, and the reason kept)."""
        lost = []
        for f in rec.network.get("forwards", []):
            try:
                vm = await h.forward_add(vm=rec.vm, host_port=f["host_port"],
                                         guest_port=f["guest_port"], protocol=f["protocol"])
            except (Conflict, InvalidRequest) as exc:
                lost.append(f)
                log.warning("forward_lost", workspace=rec.name, port=f["host_port"],
                            error=str(exc))
        if lost:
            net = dict(rec.network)
            net["forwards"] = [f for f in net.get("forwards", []) if f not in lost]
            self.catalog.update_workspace(rec.id, network=net,
                                          state_reason=f"forwards dropped at start (port "
                                          f"taken): {[f['host_port'] for f in lost]}")
        await self._refresh_peers_of(rec)
        return vm

    async def console(self, ref: str, max_bytes: int) -> tuple[WorkspaceRecord, str, str]:
        """The console tail and the helper's failure reason (if any)."""
        rec = self.get(ref)
        async with self.helper_call() as h:
            try:
                text = (await h.vm_console(name=rec.vm, max_bytes=max_bytes)).text
                vm: hp.VmInfo | None = await h.vm_get(name=rec.vm)
            except NotFound:
                text, vm = "", None
        return rec, text, (vm.reason if vm is not None else "")


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
