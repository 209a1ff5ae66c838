"""Time limits, the helper's side: one task ends the VMs whose limit passed.

The helper holds the limits (in each VM's registry record), so they fire with
no client connected.  One task watches every VM: it sleeps until the next
deadline (at most :data:`~agentiso.privhelper.timelimits.MAX_SLEEP_S`), and
is woken early when a VM starts.  A VM whose limit passed is stopped by
``VmStop``'s own path (:meth:`VmLifecycle.stop_vm`) with a short grace, in a
task of its own so one slow guest delays no other VM; with action
``destroy`` its volume is destroyed too.  Its registry entry is then
replaced by an :class:`~agentiso.privhelper.registry.EndedVmRecord` saying
why, which clients see (:mod:`.timelimited`).

The service's lock is taken only for the registry change at the end, never
across a wait on QEMU or a guest.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.abc import TaskGroup

from ..registry import EndedVmRecord, VmRecord
from ..service import WorkspaceService
from ..timelimits import (
    MAX_SLEEP_S,
    Expiry,
    Watched,
    expiry,
    next_expiry,
    reason,
    sleep_for,
)
from .channels import GuestChannels
from .lifecycle import VmLifecycle

log = structlog.get_logger("agentiso.helper.timelimits")

#: How long a guest may take to shut down when a limit ends it (then killed).
GRACE_S = 10.0
#: After a failed attempt to end a VM, wait this long before the next.
RETRY_S = 30.0


@dataclass
class TimeLimitTimer:
    ws: WorkspaceService
    lifecycle: VmLifecycle
    channels: GuestChannels
    grace_s: float = GRACE_S
    #: Idle time of a VM without a channel counts from here (the helper's start).
    started_mono: float = field(default_factory=time.monotonic)
    _wake: anyio.Event = field(default_factory=anyio.Event)
    #: VM key -> set once the task ending it is done.
    _ending: dict[str, anyio.Event] = field(default_factory=dict)
    #: VM key -> monotonic time before which a failed end is not retried.
    _retry_after: dict[str, float] = field(default_factory=dict)
    #: (owner, name) -> VmStarts in progress: such a VM is never ended (its
    #: record, limits included, exists from early in the start).
    starting: Counter[tuple[int, str]] = field(default_factory=Counter)

    def wake(self) -> None:
        """Look again now (a VM with limits started or changed)."""
        self._wake.set()

    def ending(self, key: str) -> anyio.Event | None:
        """Set once a limit has ended VM ``key`` (None: no limit is ending it)."""
        return self._ending.get(key)

    # --- what is watched ---------------------------------------------------------------

    def _watched(self, rec: VmRecord) -> Watched | None:
        lim = rec.time_limits
        if lim is None or (lim.idle_s is None and lim.lifetime_s is None):
            return None
        channel = self.channels.get(rec.key)
        return Watched(
            key=rec.key,
            limits=lim,
            started=rec.created,
            last_active=self.started_mono if channel is None else channel.last_activity,
            busy=channel is not None and channel.client_busy,
        )

    def watched(self) -> list[Watched]:
        """Every VM with a limit that no task is ending already."""
        now = time.monotonic()
        out = []
        vms = self.ws.registry.vms()
        keys = {rec.key for rec in vms}
        for key in [k for k in self._retry_after if k not in keys]:
            del self._retry_after[key]  # stopped by its owner meanwhile
        for rec in vms:
            if rec.key in self._ending or self._retry_after.get(rec.key, 0.0) > now:
                continue
            if self.starting[(rec.owner, rec.name)] > 0:
                continue
            w = self._watched(rec)
            if w is not None:
                out.append(w)
        return out

    def expires_at(self, rec: VmRecord) -> float | None:
        """When VM ``rec``'s first limit fires if nothing happens (epoch seconds)."""
        w = self._watched(rec)
        if w is None:
            return None
        now = time.time()
        e = expiry(w, now, time.monotonic())
        return None if e is None else max(now + e.delay, 0.0)

    # --- the task ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: end each VM whose limit passed, sleep until the next."""
        async with anyio.create_task_group() as tg:
            while True:
                self._wake = anyio.Event()
                try:
                    sleep = self._fire_due(tg)
                except Exception:  # a bug here must not take the helper down
                    log.exception("time_limit_timer_failed")
                    sleep = MAX_SLEEP_S
                with anyio.move_on_after(sleep):
                    await self._wake.wait()

    def _fire_due(self, tg: TaskGroup) -> float:
        """Start ending every VM whose limit passed; how long to sleep then."""
        now_wall, now_mono = time.time(), time.monotonic()
        watched = self.watched()
        for w in watched:
            e = expiry(w, now_wall, now_mono)
            if e is not None and e.delay <= 0:
                self._ending[e.key] = anyio.Event()
                tg.start_soon(self._end, e)
        rest = [w for w in watched if w.key not in self._ending]
        return sleep_for(next_expiry(rest, now_wall, now_mono))

    async def _end(self, e: Expiry) -> None:
        try:
            await self._end_vm(e)
        except Exception as exc:  # never let one VM take the timer (and helper) down
            log.exception("time_limit_end_failed", vm=e.key, limit=e.limit, error=str(exc))
            self._retry_after[e.key] = time.monotonic() + RETRY_S
        finally:
            done = self._ending.pop(e.key, None)
            if done is not None:
                done.set()
            self.wake()

    async def _end_vm(self, e: Expiry) -> None:
        registry = self.ws.registry
        rec = next((m for m in registry.vms() if m.key == e.key), None)
        if rec is None or rec.time_limits is None:
            return  # stopped meanwhile
        limits = rec.time_limits
        volume = registry.volume_by_key(rec.volume_key).name
        log.info("time_limit_fired", vm=rec.key, owner=rec.owner, limit=e.limit,
                 action=limits.action)
        before = self.lifecycle.views.info(0, rec)
        # A VM that crashed meanwhile keeps saying so: the limit only ended it.
        note = f"; it had crashed before: {before.reason}" if before.state == "crashed" else ""
        await self.lifecycle.stop_vm(rec, self.grace_s)
        with anyio.CancelScope(shield=True):
            async with self.ws.lock:
                destroyed = False
                if limits.action == "destroy":
                    try:
                        vol = registry.volume_by_key(rec.volume_key)
                        await self.ws.destroy_volume(vol)
                        destroyed = True
                    except Exception as exc:
                        # e.g. a clone depends on one of its snapshots, or a
                        # new VM of the owner took the volume meanwhile.
                        note += f"; its volume was kept: {getattr(exc, 'message', exc)}"
                        log.warning("time_limit_volume_kept", vm=rec.key, error=str(exc))
                # A VmStart of the same name may have come in meanwhile: it wins.
                if not any(m.name == rec.name for m in registry.vms(rec.owner)):
                    registry.add_ended(EndedVmRecord(
                        owner=rec.owner, name=rec.name, volume=volume, vcpus=rec.vcpus,
                        memory_mib=rec.memory_mib, created=rec.created, time_limits=limits,
                        limit=e.limit, at=time.time(),
                        action="destroy" if destroyed else "stop",
                        reason=(reason(e.limit, limits, destroyed) + note)[:4000],
                    ))
                registry.save()
        self._retry_after.pop(e.key, None)
        log.info("time_limit_ended", vm=rec.key, owner=rec.owner, limit=e.limit,
                 destroyed=destroyed)
