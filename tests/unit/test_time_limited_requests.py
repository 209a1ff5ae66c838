"""The time-limit layer over the life-cycle handlers, with stand-ins for the
services: what counts as activity, and how ended VMs are shown and forgotten."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from agentiso.privhelper.errors import HelperError
from agentiso.privhelper.registry import EndedVmRecord, Registry
from agentiso.privhelper.server import Handler, RequestContext
from agentiso.privhelper.vms.timelimited import TimeLimitedRequests
from agentiso.privhelper.vms.timer import TimeLimitTimer
from agentiso.privhelper.vms.views import VmViews
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

OWNER = 1000


@dataclass
class Channel:
    touched: int = 0
    last_activity: float = 0.0
    client_busy: bool = False

    def touch(self) -> None:
        self.touched += 1


@dataclass
class Channels:
    by_key: dict[str, Channel] = field(default_factory=dict)

    def get(self, key: str) -> Channel | None:
        return self.by_key.get(key)


@dataclass
class Lifecycle:
    registry: Registry
    views: Any = VmViews

    async def vm_get(self, req: hp.VmGet, ctx: Any) -> hp.VmInfo:
        rec = self.registry.vm(ctx.owner, req.name)  # not_found like the real one
        return hp.VmInfo(id=req.id, name=rec.name, volume="v", state="running", vcpus=1,
                         memory_mib=256, created=rec.created)

    async def vm_list(self, req: hp.VmList, ctx: Any) -> hp.Vms:
        return hp.Vms(id=req.id, vms=[])

    async def vm_stop(self, req: hp.VmStop, ctx: Any) -> hp.Done:
        self.registry.vm(ctx.owner, req.name)
        return hp.Done(id=req.id)


@dataclass
class Ws:
    registry: Registry
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass
class Ctx:
    owner: int = OWNER


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.registry = Registry(tmp_path / "registry.json")
        vol = self.registry.add_volume(OWNER, "vol", "image:minimal", 1 << 30)
        self.vm = self.registry.add_vm(OWNER, "box", vol.key, 1, 256)
        self.channel = Channel()
        self.calls: list[str] = []
        timer = TimeLimitTimer(
            ws=cast(Any, Ws(self.registry)),
            lifecycle=cast(Any, Lifecycle(self.registry)),
            channels=cast(Any, Channels({self.vm.key: self.channel})),
        )
        self.layer = TimeLimitedRequests(timer)

        def handler(name: str) -> Handler:
            async def handle(req: Any, ctx: RequestContext) -> hp.HelperResponse:
                self.calls.append(name)
                return hp.Done(id=req.id)

            return handle

        table = {t: handler(t.__name__) for t in (
            hp.VmStart, hp.VmStop, hp.VmGet, hp.VmList, hp.VmConsole, hp.VmNetworkSet,
            hp.ForwardAdd, hp.ForwardRemove, hp.SnapshotCreate)}
        self.table = self.layer.wrap(table)

    def call(self, req: Any) -> Any:
        async def run() -> Any:
            return await self.table[type(req)](req, cast(Any, Ctx()))

        return anyio.run(run)


@pytest.mark.parametrize(
    "req",
    [
        hp.VmNetworkSet(id=1, name="box", policy=hp.NetworkPolicy()),
        hp.ForwardAdd(id=1, vm="box", host_port=18080, guest_port=80),
        hp.ForwardRemove(id=1, vm="box", host_port=18080),
        hp.SnapshotCreate(id=1, volume="vol", snapshot="s"),
    ],
)
def test_requests_that_use_a_vm_are_activity(tmp_path: Path, req: Any) -> None:
    s = Setup(tmp_path)
    s.call(req)
    assert s.channel.touched >= 1
    assert s.calls == [type(req).__name__]  # and the service still handles it


def test_looking_at_a_vm_is_not_activity(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.call(hp.VmGet(id=1, name="box"))
    s.call(hp.VmList(id=1))
    s.call(hp.VmConsole(id=1, name="box"))
    assert s.channel.touched == 0


def test_an_ended_vm_is_shown_until_its_owner_stops_it(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.registry.add_ended(EndedVmRecord(
        owner=OWNER, name="gone", volume="vol2", vcpus=1, memory_mib=256, created=1.0,
        time_limits=hp.TimeLimits(idle_s=600), limit="idle", at=2.0, action="stop",
        reason="idle for 600 s (time limit)",
    ))
    info = s.call(hp.VmGet(id=7, name="gone"))
    assert isinstance(info, hp.VmInfo) and info.id == 7
    assert (info.state, info.reason, info.volume) == (
        "stopped", "idle for 600 s (time limit)", "vol2")
    assert info.ended == hp.VmEnded(limit="idle", at=2.0, action="stop")
    listing = s.call(hp.VmList(id=8))
    assert [v.name for v in listing.vms] == ["gone"]
    assert isinstance(s.call(hp.VmStop(id=9, name="gone")), hp.Done)
    for req in (hp.VmGet(id=10, name="gone"), hp.VmStop(id=11, name="gone")):
        with pytest.raises(HelperError) as err:
            s.call(req)
        assert err.value.code == ErrorCode.NOT_FOUND
    assert s.call(hp.VmList(id=12)).vms == []


def test_a_vm_whose_start_is_in_progress_is_never_ended(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    timer = s.layer.timer
    assert timer.watched() == []  # no limits
    s.vm.time_limits = hp.TimeLimits(lifetime_s=10)
    assert [w.key for w in timer.watched()] == [s.vm.key]
    timer.starting[(OWNER, "box")] += 1
    assert timer.watched() == []
    assert timer.expires_at(s.vm) is not None  # still shown to its owner


@dataclass
class EndingLifecycle:
    """Stands in for VmLifecycle.stop_vm: releases nothing but the record."""

    registry: Registry
    stopped: list[str] = field(default_factory=list)

    @property
    def views(self) -> Any:
        return self

    def info(self, rid: int, rec: Any) -> hp.VmInfo:
        return hp.VmInfo(id=rid, name=rec.name, volume="vol", state="running", vcpus=1,
                         memory_mib=256, created=rec.created)

    async def stop_vm(self, rec: Any, timeout_s: float, force: bool = False) -> None:
        self.stopped.append(rec.name)
        self.registry.remove_vm(rec.key)


@dataclass
class DestroyingWs(Ws):
    refuse: bool = False
    destroyed: list[str] = field(default_factory=list)

    async def destroy_volume(self, rec: Any) -> None:
        if self.refuse:
            raise HelperError("a clone depends on snapshot s1")
        self.destroyed.append(rec.name)
        self.registry.remove_volume(rec.key)


@pytest.mark.parametrize("refuse", [False, True])
def test_the_timer_ends_a_vm_past_its_lifetime_and_records_why(
    tmp_path: Path, refuse: bool
) -> None:
    s = Setup(tmp_path)
    s.vm.time_limits = hp.TimeLimits(lifetime_s=10, action="destroy")
    s.vm.created -= 100  # long past its lifetime
    ws = DestroyingWs(s.registry, refuse=refuse)
    lifecycle = EndingLifecycle(s.registry)
    timer = TimeLimitTimer(ws=cast(Any, ws), lifecycle=cast(Any, lifecycle),
                           channels=cast(Any, Channels()))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(timer.run)
            with anyio.fail_after(5):
                while s.registry.ended_vm(OWNER, "box") is None:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(run)
    assert lifecycle.stopped == ["box"] and s.registry.vms() == []
    ended = s.registry.ended_vm(OWNER, "box")
    assert ended is not None and ended.limit == "lifetime" and ended.volume == "vol"
    if refuse:
        assert ended.action == "stop" and ws.destroyed == []
        assert ended.reason == ("lifetime of 10 s reached (time limit); its volume was kept: "
                                "a clone depends on snapshot s1")
    else:
        assert ended.action == "destroy" and ws.destroyed == ["vol"]
        assert "destroyed" in ended.reason
    # It was saved: a restarted helper still knows why.
    assert Registry.load(s.registry.path).ended_vm(OWNER, "box") == ended
