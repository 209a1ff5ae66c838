"""The warm pool: VMs resumed from a boot template ahead of time, each
waiting, warm, to be taken over by a ``VmStart`` of its image and shape.

Why: a template create (:mod:`.templates`) still starts QEMU, resumes the
template's memory and waits for the agent's hello while the caller waits;
and under TCG the first run of every code path in a new QEMU process is
translated first, so the new identity and the first exec run cold.  A pool
VM did all of that while nobody waited: it resumed the template, took an
identity of its own and ran one command.  Taking it over is a registry
change, the network rules handed to the new owner, and a ``Reidentify``
that now runs warm.

A pool VM is an ordinary VM and volume of
:data:`~.templates.POOL_OWNER` (a uid no user has: no user's listing, root's
included, shows them), both named ``pool-<template key>-<random>``, made by
the usual ``VmStart`` of a fresh volume, so a ready template serves it (with
``share_memory``, from a RAM copy of its own: a pool VM's future user is
not known, and pages are shared only among one user's VMs).  Its network
policy allows nothing: no internet, no inbound port, no peer.

Take-over (:meth:`WarmPool.claim`, tried first by ``VmStart``): a start that
a template could serve (:func:`~.templates.claimable`, on a volume fresh
from its image) whose image, shape and disk size match a ready pool VM gets
that VM:

1. under ``ws.lock``, the pool VM and its volume become the caller's (the VM
   named as asked, the volume named as the caller's fresh one, whose record
   is set aside), and the registry is saved;
2. the link goes down, the network's rules and policy become the caller's,
   the agent takes a new hostname, machine-id, entropy and clock, and the
   link comes up.  The address and MAC stay the pool VM's: no other VM had
   them, and the allocator hands a freed address out last;
3. after the answer, the caller's set-aside fresh disk is destroyed and the
   pool refills (neither is waited for by the caller).

A failure in 2 (the pool VM died or hangs) discards the pool VM and puts the
caller's volume back: the start goes on as if there were no pool (a template
or a cold boot).  The pool refills in the background, one VM at a time,
within ``[pool] memory_mib``.

Restart: pool VMs are in the registry like any VM, and are adopted.  Each
round, the pool drops those that no longer run or belong to no configured
shape (a stale template key: the image changed), and, once at start, pool
volumes without a VM (a fill cut short).

Pure: :func:`pool_name`, :func:`key_of`, :func:`next_fill`.  I/O:
:class:`WarmPool`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import anyio
import structlog
from anyio.abc import TaskGroup

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp

from ..config import PoolConfig, PoolShape
from ..errors import HelperError
from ..peercred import PeerCredentials
from ..registry import VmRecord, VolumeRecord
from ..server import RequestContext
from ..service import WorkspaceService
from ..vm.engine import VmState
from .channels import engine_state
from .forks import reidentify_request
from .templates import POOL_OWNER, Templates, claimable, ram_holder

if TYPE_CHECKING:
    from .lifecycle import VmLifecycle

log = structlog.get_logger("agentiso.helper.pool")

NAME_PREFIX = "pool-"
_NAME = re.compile(r"\Apool-([0-9a-f]{16})-[0-9a-f]{8}\Z")
#: How often the pool looks whether it must refill or drop a VM when no
#: take-over woke it.
REFILL_POLL_S = 10.0
#: How long the refill waits after a take-over: the new owner's first
#: commands run meanwhile without a VM being made beside them (on a small
#: host a fill takes a core for a fraction of a second).
REFILL_DELAY_S = 2.0
#: The warm-up command each pool VM runs once (the first exec's paths).
WARM_UP = ("/bin/sh", "-c", "true")
WARM_UP_TIMEOUT_S = 60.0
#: How long a discarded pool VM's agent gets to power off.
STOP_TIMEOUT_S = 5.0


def pool_name(key: str, token: str) -> str:
    """The VM and volume name of a pool VM of template ``key``."""
    return f"{NAME_PREFIX}{key}-{token}"


def key_of(name: str) -> str | None:
    """The template key in a pool VM's name (None: not a pool name)."""
    m = _NAME.match(name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Want:
    """A configured shape and the key of its template now."""

    shape: PoolShape
    key: str


def next_fill(wants: Sequence[Want], have: Mapping[str, int], used_mib: int,
              budget_mib: int) -> Want | None:
    """The shape to make one more pool VM of: the first, in the configured
    order, that has fewer than its count and whose memory still fits the
    budget beside ``used_mib``; None when the pool is full."""
    for w in wants:
        if have.get(w.key, 0) < w.shape.count and used_mib + w.shape.memory_mib <= budget_mib:
            return w
    return None


def pool_context() -> RequestContext:
    """The request context of the pool's own requests."""
    peer = PeerCredentials(pid=0, uid=0, gid=0, groups=frozenset())
    return RequestContext(peer=peer, server=cast(Any, None), owner=POOL_OWNER)


@dataclass
class _Handover:
    """What a take-over changed in the registry, to put back if it fails."""

    rec: VmRecord
    pool_vol: VolumeRecord
    user_vol: VolumeRecord
    pool_name: str

    def apply(self, ws: WorkspaceService, req: hp.VmStart) -> None:
        owner = self.user_vol.owner
        ws.registry.remove_volume(self.user_vol.key)
        self.pool_vol.owner, self.pool_vol.name = owner, self.user_vol.name
        self.pool_vol.created = self.user_vol.created
        self.rec.owner, self.rec.name, self.rec.created = owner, req.name, time.time()
        self.rec.time_limits = req.time_limits

    def revert_volume(self, ws: WorkspaceService) -> None:
        """The caller's volume back as it was; the pool volume the pool's."""
        self.pool_vol.owner, self.pool_vol.name = POOL_OWNER, self.pool_name
        if all(v.key != self.user_vol.key for v in ws.registry.volumes()):
            ws.registry.data.volumes.append(self.user_vol)


@dataclass
class WarmPool:
    """Keeps ``[pool]``'s VMs ready and hands them to ``VmStart`` (module doc)."""

    ws: WorkspaceService
    config: PoolConfig
    templates: Templates
    lifecycle: VmLifecycle
    #: Runs what follows a take-over (the set-aside disk's removal, the refill).
    tg: TaskGroup | None = None
    #: Pool VMs ready to be taken over: VM key -> template key.
    ready: dict[str, str] = field(default_factory=dict)
    _wake: anyio.Event = field(default_factory=anyio.Event)
    _warned: set[str] = field(default_factory=set)

    # --- take-over ------------------------------------------------------------------

    async def claim(self, req: hp.VmStart, ctx: RequestContext) -> hp.VmInfo | None:
        """Take a ready pool VM over for ``req``, or None (start as usual)."""
        if not self.ready or ctx.owner == POOL_OWNER or not self.templates.config.use:
            return None
        ws = self.ws
        async with ws.lock:
            vol = self.lifecycle.check_start(ctx.owner, req)
            if not claimable(vol, req) or vol.pristine_clone_of is not None:
                return None
            try:
                key = self.templates.key_for(vol.image, req.vcpus, req.memory_mib)
            except HelperError:
                return None  # the start reports it
            handover = self._take(key, vol)
            if handover is None:
                return None
            handover.apply(ws, req)
            try:
                ws.registry.save()
            except BaseException:
                handover.rec.owner, handover.rec.name = POOL_OWNER, handover.pool_name
                handover.revert_volume(ws)
                self.ready[handover.rec.key] = key
                raise
        steps: dict[str, float] = {}
        try:
            machine_id = await self._take_over(handover.rec, req, steps)
        except Exception as exc:
            log.warning("pool_takeover_failed", vm=handover.rec.key, error=str(exc),
                        hint="the start goes on without the pool")
            with anyio.CancelScope(shield=True):
                await self._undo(handover)
            return None
        except BaseException:  # cancelled: nothing half-made stays
            with anyio.CancelScope(shield=True):
                await self._undo(handover)
            raise
        t = anyio.current_time()
        async with ws.lock:
            handover.pool_vol.machine_id = machine_id
            ws.registry.save()
        steps["saved"] = anyio.current_time() - t
        log.info("pool_taken_over", vm=handover.rec.key, owner=ctx.owner, template=key,
                 ms={k: round(v * 1000, 1) for k, v in steps.items()})
        # After the answer: the caller's set-aside disk goes, then the pool
        # refills.  Neither waits on the caller (a refill holds ws.lock while
        # it loads a RAM copy, which the save above would otherwise wait for).
        if self.tg is not None:
            self.tg.start_soon(self._cleanup, handover.user_vol.key)
        else:
            await self._cleanup(handover.user_vol.key)
        return self.lifecycle.views.info(req.id, handover.rec)

    async def _cleanup(self, old_disk: str) -> None:
        try:
            await self.ws.storage.destroy_volume(old_disk)
        except HelperError as exc:
            log.warning("pool_takeover_left_disk", key=old_disk, error=exc.message,
                        hint="agentiso-helper gc")
        await anyio.sleep(REFILL_DELAY_S)
        self._wake.set()

    def _take(self, key: str, vol: VolumeRecord) -> _Handover | None:
        """Remove from :attr:`ready` a running pool VM of ``key`` whose disk
        is ``vol``'s size.  The caller holds ``ws.lock``."""
        registry = self.ws.registry
        for vm_key, vm_tpl in list(self.ready.items()):
            if vm_tpl != key:
                continue
            rec = next((m for m in registry.vms(POOL_OWNER) if m.key == vm_key), None)
            if rec is None or engine_state(self.lifecycle.engine, vm_key) != VmState.RUNNING:
                del self.ready[vm_key]  # gone or dying: the next round drops it
                continue
            try:
                pool_vol = registry.volume_by_key(rec.volume_key)
            except HelperError:
                del self.ready[vm_key]
                continue
            if pool_vol.size_bytes != vol.size_bytes:
                continue
            del self.ready[vm_key]
            return _Handover(rec=rec, pool_vol=pool_vol, user_vol=vol, pool_name=rec.name)
        return None

    async def _take_over(self, rec: VmRecord, req: hp.VmStart, steps: dict[str, float]) -> str:
        """The pool VM ``rec`` (now the caller's) takes its new owner's rules
        and a new identity with its link down.  Returns the new machine-id;
        ``steps`` gets each step's time (seconds), for the log."""
        lc = self.lifecycle
        assert req.network is not None  # claimable() checked it
        t = anyio.current_time()

        def lap(name: str) -> None:
            nonlocal t
            now = anyio.current_time()
            steps[name], t = now - t, now

        await lc.engine.set_link(rec.key, False)
        lap("link_down")
        net = await lc.network.hand_over(rec.owner, rec.key, req.network)
        lap("rules")
        channel = lc.channels.of_running(rec)
        identity = reidentify_request(req.name, net, net.mac)
        await lc.guest_step(req, rec.key, channel, identity)
        lap("reidentify")
        await lc.engine.set_link(rec.key, True)
        lap("link_up")
        channel.touch()  # an idle limit counts from now, not from the fill
        return identity.machine_id

    async def _undo(self, handover: _Handover) -> None:
        """A take-over failed: the pool VM goes, the caller's volume is back."""
        with suppress(HelperError):
            await self.lifecycle.stop_vm(handover.rec, STOP_TIMEOUT_S, force=True)
        async with self.ws.lock:
            handover.revert_volume(self.ws)
            self.ws.registry.save()
            with suppress(HelperError):
                await self.ws.destroy_volume(handover.pool_vol)
        self._wake.set()

    # --- keeping it full --------------------------------------------------------------

    async def run(self) -> None:
        """Refill and prune until cancelled (a task of the helper's, started
        once its VMs are adopted)."""
        if not self.config.shapes:
            return
        await self._drop_volumes_without_vm()
        while True:
            try:
                await self.refill()
            except HelperError as exc:
                log.warning("pool_refill_failed", error=exc.message)
            except Exception:  # a bug here must not take the helper down
                log.exception("pool_refill_crashed")
            with anyio.move_on_after(REFILL_POLL_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    def wants(self) -> list[Want]:
        """The configured shapes with their templates' keys now (a shape
        whose image cannot be loaded is left out, and logged once)."""
        out = []
        for shape in self.config.shapes:
            try:
                key = self.templates.key_for(shape.image, shape.vcpus, shape.memory_mib)
            except HelperError as exc:
                if shape.image not in self._warned:
                    self._warned.add(shape.image)
                    log.warning("pool_image_unusable", image=shape.image, error=exc.message)
                continue
            out.append(Want(shape, key))
        return out

    async def refill(self) -> None:
        """Drop the pool VMs that no longer fit, then fill up, one at a time."""
        wants = self.wants()
        await self._drop_unwanted({w.key for w in wants})
        while True:
            used = sum(m.memory_mib for m in self.ws.registry.vms(POOL_OWNER))
            want = next_fill(wants, Counter(self.ready.values()), used, self.config.memory_mib)
            if want is None or not await self._fill(want):
                return

    async def _fill(self, want: Want) -> bool:
        """Make one pool VM of ``want``; False: not now (its template is
        being built by someone else: the next round tries again)."""
        shape = want.shape
        if self.templates.config.use and not self.templates.is_ready(
                want.key, shape.vcpus, shape.memory_mib):
            await self.templates.build(shape.image, shape.vcpus, shape.memory_mib)
            if not self.templates.is_ready(want.key, shape.vcpus, shape.memory_mib):
                return False
        name = pool_name(want.key, secrets.token_hex(4))
        ctx = pool_context()
        ws = self.ws
        await ws.volume_create(
            hp.VolumeCreate(id=0, name=name, source=hp.FromImage(image=shape.image)), ctx)
        try:
            await self.lifecycle.vm_start(
                hp.VmStart(id=0, name=name, volume=name, vcpus=shape.vcpus,
                           memory_mib=shape.memory_mib, network=hp.NetworkPolicy()), ctx)
            rec = ws.registry.vm(POOL_OWNER, name)
            # Its QEMU maps its RAM copy now; nothing else ever will.
            self.templates.drop_rams_of(ram_holder(ws.registry.volume_by_key(rec.volume_key)))
            channel = self.lifecycle.channels.of_running(rec)
            await channel.call(gp.Exec(id=0, argv=list(WARM_UP), timeout_s=30.0),
                               WARM_UP_TIMEOUT_S)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove(name)
            raise
        self.ready[rec.key] = want.key
        log.info("pool_filled", vm=rec.key, template=want.key, image=shape.image)
        return True

    async def _drop_unwanted(self, keys: set[str]) -> None:
        """Remove pool VMs that no longer run or fit no configured shape (a
        stale template: the image changed); count as ready those that run
        and fit but are not known yet (adopted after a helper restart)."""
        for rec in list(self.ws.registry.vms(POOL_OWNER)):
            tpl = key_of(rec.name)
            if tpl in keys and engine_state(self.lifecycle.engine, rec.key) == VmState.RUNNING:
                self.ready.setdefault(rec.key, tpl or "")
                continue
            log.info("pool_dropped", vm=rec.key, name=rec.name)
            await self._remove(rec.name)

    async def _drop_volumes_without_vm(self) -> None:
        """Pool volumes no VM runs on: a fill cut short by a helper stop."""
        registry = self.ws.registry
        for vol in list(registry.volumes(POOL_OWNER)):
            if registry.vm_on_volume(vol.key) is None:
                await self._remove(vol.name)

    async def _remove(self, name: str) -> None:
        """Remove pool VM ``name`` and its volume, whichever exist."""
        ws = self.ws
        rec = next((m for m in ws.registry.vms(POOL_OWNER) if m.name == name), None)
        if rec is not None:
            self.ready.pop(rec.key, None)
            with suppress(HelperError):
                await self.lifecycle.stop_vm(rec, STOP_TIMEOUT_S, force=True)
        async with ws.lock:
            vol = next((v for v in ws.registry.volumes(POOL_OWNER) if v.name == name), None)
            if vol is not None:
                try:
                    await ws.destroy_volume(vol)
                except HelperError as exc:
                    log.warning("pool_volume_not_removed", volume=name, error=exc.message)
