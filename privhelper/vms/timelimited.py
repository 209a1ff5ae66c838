"""Time limits, as clients see them: a thin layer over the life-cycle requests.

* ``VmStart`` (whose record keeps the limits) is shielded from the timer
  until it is over, and replaces the ended record of the same name.
* ``VmGet``/``VmList`` also answer for VMs a limit ended (state
  ``stopped``, ``ended``, ``reason``); running VMs show their limits and
  ``expires_at`` (through :attr:`VmViews.expires_at`).
* ``VmStop`` of a VM a limit is ending waits for it, and ``VmStop`` of an
  ended VM forgets its record.
* Requests that *use* a VM count as activity for its idle limit
  (:data:`USES`, ``GuestOpen``); looking at one (``VmGet``, ``VmList``,
  ``VmConsole``) does not, so a frontend polling its list keeps nothing
  alive.  Relayed guest traffic is counted by the relay itself.

The life-cycle service keeps claiming these requests (``HANDLES``); this
layer wraps its handlers in the server's table (:meth:`wrap`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from ..errors import HelperError
from ..registry import VmRecord
from ..relay import GuestChannel
from ..server import Handler, RequestContext
from .timer import TimeLimitTimer

#: Requests that use a running VM: request type -> the VM it names, from
#: the request and its owner (None: no running VM).
USES: dict[type[Any], Callable[[Any], str]] = {
    hp.VmNetworkSet: lambda r: r.name,
    hp.ForwardAdd: lambda r: r.vm,
    hp.ForwardRemove: lambda r: r.vm,
}


@dataclass
class TimeLimitedRequests:
    timer: TimeLimitTimer

    def wrap(self, table: dict[type[Any], Handler]) -> dict[type[Any], Handler]:
        """The server's handler table with this layer over the life cycle's."""
        out = dict(table)
        out[hp.VmStart] = self.vm_start
        out[hp.VmStop] = self.vm_stop
        out[hp.VmGet] = self.vm_get
        out[hp.VmList] = self.vm_list
        for req_type, vm_of in USES.items():
            out[req_type] = self._touching(table[req_type], vm_of)
        out[hp.SnapshotCreate] = self._touching_volume(table[hp.SnapshotCreate])
        return out

    # --- activity ----------------------------------------------------------------------

    def touch(self, rec: VmRecord | None) -> None:
        channel = None if rec is None else self.timer.channels.get(rec.key)
        if channel is not None:
            channel.touch()

    def _live(self, owner: int, name: str) -> VmRecord | None:
        return next((m for m in self.timer.ws.registry.vms(owner) if m.name == name), None)

    def _touching(self, handler: Handler, vm_of: Callable[[Any], str]) -> Handler:
        async def handle(req: Any, ctx: RequestContext) -> hp.HelperResponse:
            rec = self._live(ctx.owner, vm_of(req))
            self.touch(rec)
            try:
                return await handler(req, ctx)
            finally:
                self.touch(rec)

        return handle

    def _touching_volume(self, handler: Handler) -> Handler:
        async def handle(req: Any, ctx: RequestContext) -> hp.HelperResponse:
            reg = self.timer.ws.registry
            vol = next((v for v in reg.volumes(ctx.owner) if v.name == req.volume), None)
            rec = None if vol is None else reg.vm_on_volume(vol.key)
            self.touch(rec)
            try:
                return await handler(req, ctx)
            finally:
                self.touch(rec)  # a memory snapshot may take longer than the idle limit

        return handle

    async def open_guest(self, req: hp.GuestOpen, ctx: RequestContext) -> GuestChannel:
        channel = await self.timer.lifecycle.open_guest(req, ctx)
        channel.touch()
        return channel

    # --- life cycle --------------------------------------------------------------------

    async def vm_start(self, req: hp.VmStart, ctx: RequestContext) -> hp.VmInfo:
        # The life cycle keeps the limits on the record; the timer waits
        # until the start is over (a VM still booting is never ended).
        starting = self.timer.starting
        starting[(ctx.owner, req.name)] += 1
        try:
            info = await self.timer.lifecycle.vm_start(req, ctx)
            rec = self._live(ctx.owner, req.name)
            self.touch(rec)  # idle counts from the end of the start
        finally:
            starting[(ctx.owner, req.name)] -= 1
            if starting[(ctx.owner, req.name)] <= 0:
                del starting[(ctx.owner, req.name)]
        ws = self.timer.ws
        async with ws.lock:
            if ws.registry.forget_ended(ctx.owner, req.name):
                ws.registry.save()
        self.timer.wake()
        # Shown again after the touch: idle time counts from now, not from
        # before the boot (unless a concurrent VmStop took it meanwhile).
        rec = self._live(ctx.owner, req.name)
        return info if rec is None else self.timer.lifecycle.views.info(req.id, rec)

    async def vm_stop(self, req: hp.VmStop, ctx: RequestContext) -> hp.Done:
        rec = self._live(ctx.owner, req.name)
        ending = None if rec is None else self.timer.ending(rec.key)
        if ending is not None:
            await ending.wait()  # a limit is ending it: the owner's stop then forgets it
            rec = self._live(ctx.owner, req.name)
        if rec is None:
            ws = self.timer.ws
            async with ws.lock:
                if ws.registry.forget_ended(ctx.owner, req.name):
                    ws.registry.save()
                    return hp.Done(id=req.id)
        return await self.timer.lifecycle.vm_stop(req, ctx)  # not_found if none

    async def vm_get(self, req: hp.VmGet, ctx: RequestContext) -> hp.VmInfo:
        try:
            return await self.timer.lifecycle.vm_get(req, ctx)
        except HelperError as exc:
            ended = self.timer.ws.registry.ended_vm(ctx.owner, req.name)
            if exc.code != ErrorCode.NOT_FOUND or ended is None:
                raise
            return self.timer.lifecycle.views.ended_info(req.id, ended)

    async def vm_list(self, req: hp.VmList, ctx: RequestContext) -> hp.Vms:
        resp = await self.timer.lifecycle.vm_list(req, ctx)
        if resp.next_cursor is not None:
            return resp  # the ended ones follow on the last page only
        live = {vm.name for vm in self.timer.ws.registry.vms(ctx.owner)}
        resp.vms.extend(
            self.timer.lifecycle.views.ended_info(0, e)
            for e in self.timer.ws.registry.ended_vms(ctx.owner)
            if e.name not in live
        )
        return resp
