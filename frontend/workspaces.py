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
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import NotFound

from . import lifecycle, quotas
from .catalog import Catalog, WorkspaceRecord, validate_workspace_name
from .config import FrontendConfig
from .errors import ConnectionLost, FrontendError
from .forks import ForkOps
from .guest_channel import open_guest
from .guest_client import GuestClient
from .helper_client import HelperClient, connect_helper
from .keepopen import KeptOpen
from .lifecycle import Event, Operation, State
from .sessions import Session, session_alive
from .snapshots import SnapshotOps
from .workspace_errors import WorkspaceError, WorkspaceNotFound
from .workspace_network import NetworkOps

log = structlog.get_logger("agentiso.frontend.workspaces")

GiB = 1024 * 1024 * 1024
#: After an interrupted create: how many cleanup passes, and the pause
#: between them, while the helper may still finish a request we abandoned.
SETTLE_PASSES = 20
SETTLE_PAUSE_S = 0.5
#: How long a graceful stop may take before the helper kills the VM.
STOP_TIMEOUT_S = 30.0
Progress = Callable[[str], Awaitable[None]]


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


async def _no_progress(_: str) -> None:
    return None


@dataclass(frozen=True)
class Detail:
    """A workspace as the tools show it: the row, and the helper's view."""

    record: WorkspaceRecord
    vm: hp.VmInfo | None
    volume: hp.VolumeInfo | None
    #: The name of the workspace it was forked from (its id if that is gone).
    parent_name: str | None = None
    #: The snapshots of its tree, as the catalog keeps them (a restore moves the
    #: workspace onto another volume, so the helper's per-volume list is not it).
    snapshot_count: int = 0


@dataclass(frozen=True)
class Orphan:
    """A helper resource of ours that no catalog row claims."""

    kind: str  # "vm" or "volume"
    name: str
    state: str


class Workspaces(NetworkOps, SnapshotOps, ForkOps):
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
            "helper connection", is_closed=lambda c: c.closed,
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
        async with self._guest_channel(rec) as client:
            yield client

    @asynccontextmanager
    async def _guest_channel(self, rec: WorkspaceRecord) -> AsyncIterator[GuestClient]:
        """The kept guest channel of ``rec``'s VM, whatever the row's state
        (create and start use it before the row says running)."""
        kept = self._guests.get(rec.vm)
        if kept is None:
            sock = self.config.helper_socket
            timeout = float(self.config.limits.boot_timeout_secs)
            vm = rec.vm
            kept = self._guests[rec.vm] = KeptOpen(
                self._tg, lambda: open_guest(sock, vm, timeout=timeout),
                f"guest channel of {rec.name}", is_closed=lambda c: c.closed,
            )
        client = await kept.get()
        try:
            yield client
        except ConnectionLost:
            kept.invalidate(client)
            raise

    async def _ping(self, rec: WorkspaceRecord) -> None:
        """The workspace's agent answers through our kept channel (before the
        row may say running)."""
        async with self._guest_channel(rec) as g:
            await g.ping()

    def _time_limits(self, rec: WorkspaceRecord) -> hp.TimeLimits | None:
        return _limits(rec)

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

    async def _owned_fresh(self, ref: str) -> WorkspaceRecord:
        """:meth:`owned`, with an abandoned operation on it finished first."""
        rec = await self._recover_if_abandoned(self.owned(ref))
        if rec is None:
            raise WorkspaceNotFound(ref)
        return rec

    async def adopt(self, ref: str) -> WorkspaceRecord:
        """Make this session the owner of a workspace (even one whose session
        still runs: an explicit take-over).  An operation its dead owner left
        half-done is finished first (a busy row adopted as it is would stay
        busy for as long as this session lives)."""
        rec = await self._recover_if_abandoned(self.catalog.get_workspace(ref))
        if rec is None:
            raise WorkspaceNotFound(ref)
        adopted = self.catalog.adopt(rec.id, self.session.id)
        return adopted if adopted is not None else self.catalog.get_workspace(rec.id)

    async def adopt_all(self) -> list[WorkspaceRecord]:
        """Adopt every workspace whose session has ended (finishing what such
        a session left half-done first)."""
        taken = []
        for listed in self.catalog.list_workspaces():
            if listed.session == self.session.id:
                continue
            rec = await self._recover_if_abandoned(listed)
            if rec is None or rec.state in lifecycle.BUSY_STATES:
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
        time_limits: dict[str, Any] | None = None,
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
            parent_snapshot=None, time_limits=time_limits or {},
        )
        self.catalog.add_workspace(rec, check=lambda rows: quotas.check(
            self.config.quotas, rows, self.session.id, ask, default_disk_gb=image_gb))
        try:
            async with self.helper_call() as h:
                await progress("creating the disk from image " + image)
                # The first volume of an image imports it: give it the boot's time.
                await h.volume_create(
                    name=wid, source=hp.FromImage(image=image),
                    size_bytes=disk_gb * GiB if disk_gb else None,
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
                await progress("booting the VM")
                vm = await h.vm_start(
                    name=wid, volume=wid, vcpus=vcpus, memory_mib=memory_mb,
                    network=self._policy(rec), time_limits=_limits(rec),
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
            await progress("connecting to the guest agent")
            await self._ping(rec)
            rec = self._advance(rec, Event.CREATED)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._undo_create(rec, exc)
            raise
        return Detail(rec, vm, None)

    async def _undo_create(self, rec: WorkspaceRecord, exc: BaseException) -> None:
        """Undo a failed or cancelled create: the row goes to destroying first
        (so a crash now leaves it for recovery), then what the helper holds is
        removed; the row is deleted only once the helper holds nothing of it.
        Otherwise it is left to any frontend's recovery (no owning session)."""
        try:
            rec = self.catalog.set_state(rec.id, State.DESTROYING,
                                         f"create failed: {_reason(exc)}")
        except FrontendError:
            return
        if await self._remove_resources(rec, strict=False, settle=True):
            self._drop_guest(rec.vm)
            self.catalog.delete_workspace(rec.id)
        else:
            self.catalog.update_workspace(rec.id, session=None)

    def _auto_name(self, image: str) -> str:
        for _ in range(20):
            name = f"{image[:50]}-{secrets.token_hex(2)}"
            if self.catalog.find_workspace(name) is None:
                return name
        return f"{image[:40]}-{secrets.token_hex(6)}"

    async def _kill_vm(self, vm: str) -> None:
        """Kill the VM if the helper has it (for start's undo and a crashed VM)."""
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

    async def start(self, ref: str, progress: Progress = _no_progress) -> Detail:
        rec = await self._owned_fresh(ref)
        lifecycle.require(rec.name, rec.state, Operation.START)
        try:  # a time limit with on_timeout="destroy" leaves only the row
            async with self.helper_call() as h:
                await h.volume_get(name=rec.volume)
        except NotFound:
            raise WorkspaceError(
                f"workspace {rec.name!r} has no disk any more "
                f"({rec.state_reason or 'its volume is gone from the helper'})",
                "Remove the entry with workspace_destroy and create a new workspace.",
            ) from None
        return await self._boot(rec, None, progress)

    async def _boot(self, rec: WorkspaceRecord, resume: str | None,
                    progress: Progress = _no_progress) -> Detail:
        """Start the VM of a stopped (or crashed) workspace: booting its disk, or
        resuming the memory saved with helper snapshot ``resume``."""
        quotas.check(self.config.quotas, self.catalog.list_workspaces(), self.session.id,
                     quotas.Ask(workspaces=0, vcpus=rec.vcpus, memory_mb=rec.memory_mb,
                                disk_gb=0), exclude=rec.id)
        rec = self._advance(rec, Event.START_REQUESTED)
        try:
            # A crashed VM stays registered until stopped: clear it first.
            await self._kill_vm(rec.vm)
            await progress("resuming the saved memory" if resume else "booting the VM")
            async with self.helper_call() as h:
                vm = await h.vm_start(
                    name=rec.vm, volume=rec.volume, vcpus=rec.vcpus, memory_mib=rec.memory_mb,
                    network=self._policy(rec), resume_snapshot=resume,
                    time_limits=_limits(rec),
                    timeout=float(self.config.limits.boot_timeout_secs),
                )
                vm = await self._restore_forwards(h, rec, vm)
            await progress("connecting to the guest agent")
            await self._ping(rec)
            rec = self._advance(rec, Event.STARTED)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._kill_vm(rec.vm)
                self.catalog.set_state(rec.id, State.STOPPED, f"start failed: {_reason(exc)}")
            raise
        return Detail(rec, vm, None)

    async def stop(self, ref: str, *, force: bool = False) -> WorkspaceRecord:
        rec = await self._owned_fresh(ref)
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
        rec = await self._owned_fresh(ref)
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

    async def _remove_resources(self, rec: WorkspaceRecord, *, strict: bool,
                                settle: bool = False) -> bool:
        """Kill the VM and destroy the volume; what is already gone is fine.
        ``strict``: other failures are raised (else logged and False).

        ``settle`` (after an interrupted create): the helper may still be
        working on a request we stopped waiting for, so a VM may appear after
        the first pass; passes repeat until the helper holds neither.
        Returns True once it holds nothing of the workspace."""
        self._drop_guest(rec.vm)
        # Clones before what they were cloned from: the current volume first,
        # then the others newest first (a restore clones an older volume).
        newest: dict[str, float] = {}
        for snap in self.catalog.list_snapshots(rec.id):
            newest[snap.volume] = max(newest.get(snap.volume, 0.0), snap.created_at)
        newest.pop(rec.volume, None)
        volumes = [rec.volume, *sorted(newest, key=lambda v: -newest[v])]
        for attempt in range(SETTLE_PASSES if settle else 1):
            if attempt:
                await anyio.sleep(SETTLE_PAUSE_S)
            try:
                async with self.helper_call() as h:
                    try:
                        await h.vm_stop(name=rec.vm, force=True)
                    except NotFound:
                        pass
                    for volume in volumes:
                        try:
                            await h.volume_destroy(name=volume)
                        except NotFound:
                            pass
                    if not settle:
                        return True
                    await anyio.sleep(SETTLE_PAUSE_S)
                    if await _absent(h.vm_get(name=rec.vm)) and all(
                            [await _absent(h.volume_get(name=v)) for v in volumes]):
                        return True
            except Exception as exc:
                if strict:
                    raise
                log.warning("cleanup_failed", workspace=rec.name, error=str(exc))
        return False

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
        found = await self._recover_if_abandoned(self.get(ref))
        if found is None:
            raise WorkspaceNotFound(ref)
        rec = found
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
        parent = None
        if rec.parent_workspace:
            found_parent = self.catalog.find_workspace(rec.parent_workspace)
            parent = found_parent.name if found_parent else rec.parent_workspace
        return Detail(rec, vm, vol, parent, len(self.catalog.list_snapshots(rec.id)))

    async def list_all(self) -> tuple[list[Detail], list[Orphan]]:
        """Every workspace of this user (reconciled with the helper) and the
        helper's resources no row claims (shown, never hidden)."""
        async with self.helper_call() as h:
            vms = {v.name: v for v in (await h.vm_list()).vms}
            vols = {v.name: v for v in (await h.volume_list()).volumes}
        out = []
        claimed_vms: set[str] = set()
        claimed_vols: set[str] = set()
        for listed in self.catalog.list_workspaces():
            claimed_vms.add(listed.vm)
            claimed_vols.add(listed.volume)
            rec = await self._recover_if_abandoned(listed)
            if rec is None:
                continue
            vm = vms.get(rec.vm)
            out.append(Detail(self._reconciled(rec, vm), vm, vols.get(rec.volume)))
        orphans = [Orphan("vm", n, v.state) for n, v in vms.items() if n not in claimed_vms]
        orphans += [Orphan("volume", n, "in use" if v.vm else "idle")
                    for n, v in vols.items() if n not in claimed_vols]
        return out, orphans

    def _reconciled(self, rec: WorkspaceRecord, vm: hp.VmInfo | None) -> WorkspaceRecord:
        """The row, corrected where the helper contradicts it (e.g. a VM that died)."""
        if rec.state in lifecycle.BUSY_STATES:
            return rec  # an operation is under way (a dead one's: _recover_if_abandoned)
        state, reason = lifecycle.reconcile(rec.state, None if vm is None else vm.state)
        if state == rec.state:
            return rec
        if state != State.RUNNING:
            self._drop_guest(rec.vm)
        if vm is not None and vm.ended is not None and vm.ended.action == "destroy":
            reason = f"{vm.reason}; only this entry is left (workspace_destroy removes it)"
        elif vm is not None and vm.reason:
            reason = f"{reason}: {vm.reason}"
        try:
            return self.catalog.set_state(rec.id, state, reason, expect=[rec.state])
        except FrontendError:
            return self.catalog.get_workspace(rec.id)

    async def _recover_if_abandoned(self, rec: WorkspaceRecord) -> WorkspaceRecord | None:
        """A row left busy by a frontend that is gone is finished here (an
        interrupted create or destroy is completed as a destroy: None is
        returned; an interrupted start or stop settles to what the helper
        shows).  A row busy in a live session is returned as it is."""
        if rec.state not in lifecycle.BUSY_STATES:
            return rec
        if rec.session and session_alive(self.config.state_dir, rec.session):
            return rec
        try:
            async with self.helper_call() as h:
                vm_state: str | None = (await h.vm_get(name=rec.vm)).state
        except NotFound:
            vm_state = None
        state, reason = lifecycle.recover(rec.state, vm_state)
        try:
            rec = self.catalog.set_state(rec.id, state, reason, expect=[rec.state])
        except FrontendError:
            return self.catalog.find_workspace(rec.id)  # another frontend recovers it
        log.info("recovered_abandoned", workspace=rec.name, now=str(state))
        if state is not State.DESTROYING:
            return rec
        with anyio.CancelScope(shield=True):
            if await self._remove_resources(rec, strict=False, settle=True):
                self.catalog.delete_workspace(rec.id)
                return None
        self.catalog.update_workspace(rec.id, session=None)
        return self.catalog.find_workspace(rec.id)

    async def reconcile_all(self) -> None:
        """On start: every row is recovered if abandoned, then corrected from
        the helper's view (the same happens whenever a row is listed)."""
        await self.list_all()

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


def _limits(rec: WorkspaceRecord) -> hp.TimeLimits | None:
    """The helper's time limits of a workspace (None: none)."""
    t = rec.time_limits
    if not t.get("idle_s") and not t.get("lifetime_s"):
        return None
    return hp.TimeLimits(idle_s=t.get("idle_s"), lifetime_s=t.get("lifetime_s"),
                         action=t.get("action", "stop"))


async def _absent(call: Awaitable[object]) -> bool:
    """Whether a helper lookup answers not_found."""
    try:
        await call
    except NotFound:
        return True
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
