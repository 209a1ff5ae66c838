"""Time limits through the real helper: real QEMU (TCG), the real guest, no
frontend.  A limit fires with no client connected; the VM's record then says
why (state ``stopped``, ``ended``, ``reason``) until the next VmStop or a
VmStart of its name; everything it held is released (QEMU, TAP, rules, its
address, and with ``destroy`` its volume)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.privhelper.net.store import STATE_FILE_NAME
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import NotFound
from tests.harness.images import skip_unless_image
from tests.support.helper_process import IMAGES, HelperProcess, running_helper

GROUP = 64351
DEFAULT_POLICY = hp.NetworkPolicy()
pytestmark = skip_unless_image("minimal")


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    with running_helper(group=GROUP, extra_args=("--images-dir", str(IMAGES))) as h:
        yield h


def client(helper: HelperProcess) -> BlockingHelperClient:
    return BlockingHelperClient(str(helper.socket), timeout=180)


def start(
    helper: HelperProcess, vm: str, volume: str, limits: hp.TimeLimits,
    network: hp.NetworkPolicy | None = DEFAULT_POLICY,
) -> hp.VmInfo:
    with client(helper) as c:
        try:
            c.request(hp.VolumeGet(id=0, name=volume))
        except NotFound:
            c.request(hp.VolumeCreate(id=0, name=volume, source=hp.FromImage(image="minimal")))
        info = c.request(hp.VmStart(id=0, name=vm, volume=volume, time_limits=limits,
                                    network=network))
    assert isinstance(info, hp.VmInfo) and info.state == "running", info
    assert info.time_limits == limits and info.ended is None
    assert info.expires_at is not None
    if limits.lifetime_s is not None and limits.idle_s is None:
        # Counted from the start, however long the boot took (a loaded host
        # may take longer than a short lifetime: then it is already due).
        assert abs(info.expires_at - (info.created + limits.lifetime_s)) < 1
    else:
        assert info.expires_at > time.time()
    return info


def get(helper: HelperProcess, vm: str) -> hp.VmInfo:
    with client(helper) as c:
        info = c.request(hp.VmGet(id=0, name=vm))
    assert isinstance(info, hp.VmInfo)
    return info


def wait_ended(helper: HelperProcess, vm: str, within: float) -> tuple[hp.VmInfo, float]:
    """Poll (VmGet is no activity) until a limit ended ``vm``; its info and when."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        info = get(helper, vm)
        if info.ended is not None:
            return info, time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"{vm} was not ended within {within} s: {get(helper, vm)}")


def links(helper: HelperProcess) -> str:
    return subprocess.run(["ip", "-n", helper.netns, "-o", "link"], capture_output=True,
                          text=True, check=True).stdout


def nothing_left_of(helper: HelperProcess, info: hp.VmInfo) -> None:
    assert helper.qemu_pids() == []
    assert info.network is not None
    ruleset = subprocess.run(["ip", "netns", "exec", helper.netns, "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=True).stdout
    for needle in (info.network.mac, info.network.address):
        assert needle not in links(helper) and needle not in ruleset, needle
    state = json.loads((helper.state_dir / STATE_FILE_NAME).read_text())
    assert info.network.address not in json.dumps(state)  # back in the pool


def test_idle_timeout_stops_a_vm_with_no_client_and_says_why(helper: HelperProcess) -> None:
    started = start(helper, "idler", "idler-vol", hp.TimeLimits(idle_s=15))
    t0 = time.monotonic()
    # No client from here on: only looks (VmGet), which are no activity.
    info, t1 = wait_ended(helper, "idler", within=40)
    assert 14 <= t1 - t0 <= 28, t1 - t0
    assert info.state == "stopped" and info.reason == "idle for 15 s (time limit)"
    assert info.ended is not None and info.ended.limit == "idle"
    assert info.ended.action == "stop" and info.ended.at <= time.time()
    assert info.network is None and info.expires_at is None
    assert info.time_limits == hp.TimeLimits(idle_s=15) and info.volume == "idler-vol"
    with client(helper) as c:
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and [(v.name, v.state, v.reason) for v in vms.vms] == [
            ("idler", "stopped", "idle for 15 s (time limit)")
        ]
        vol = c.request(hp.VolumeGet(id=0, name="idler-vol"))  # kept, and free
        assert isinstance(vol, hp.VolumeInfo) and vol.vm is None
    nothing_left_of(helper, started)
    # A VmStart of the same name replaces the record; VmStop then stops it.
    again = start(helper, "idler", "idler-vol", hp.TimeLimits(lifetime_s=600))
    assert again.reason == ""
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="idler"))
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="idler"))
        c.request(hp.VolumeDestroy(id=0, name="idler-vol"))
    assert helper.qemu_pids() == []


def test_traffic_keeps_a_vm_alive_but_its_lifetime_ends_it(helper: HelperProcess) -> None:
    start(helper, "busy", "busy-vol", hp.TimeLimits(idle_s=10, lifetime_s=40), network=None)
    t0 = time.monotonic()

    async def traffic(until: float) -> None:
        # One guest session, opened once: from then on only relayed requests.
        async with open_guest(str(helper.socket), "busy") as g:
            while time.monotonic() < until:
                r = await g.exec(shell="echo hi")
                assert r.exit_code == 0 and r.stdout == b"hi\n"
                await anyio.sleep(2)

    anyio.run(traffic, t0 + 25)
    info = get(helper, "busy")
    assert info.state == "running" and info.ended is None  # 25 s > 10 s idle limit
    with pytest.raises(Exception):  # noqa: B017 - the channel ends with the VM
        anyio.run(traffic, t0 + 120)
    info, t1 = wait_ended(helper, "busy", within=20)
    assert info.ended is not None and info.ended.limit == "lifetime"
    assert info.reason == "lifetime of 40 s reached (time limit)"
    assert t1 - t0 <= 40 + 15
    assert helper.qemu_pids() == []
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="busy"))  # forgets the record
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="busy"))
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and vms.vms == []
        with pytest.raises(NotFound):
            c.request(hp.VmStop(id=0, name="busy"))
        c.request(hp.VolumeDestroy(id=0, name="busy-vol"))


def test_destroy_removes_the_volume_too(helper: HelperProcess) -> None:
    start(helper, "doomed", "doomed-vol", hp.TimeLimits(lifetime_s=10, action="destroy"),
          network=None)
    info, _ = wait_ended(helper, "doomed", within=35)
    assert info.state == "stopped" and info.ended is not None
    assert info.ended.action == "destroy" and info.ended.limit == "lifetime"
    assert "destroyed" in info.reason and info.volume == "doomed-vol"
    assert helper.qemu_pids() == []
    with client(helper) as c:
        with pytest.raises(NotFound):
            c.request(hp.VolumeGet(id=0, name="doomed-vol"))
        vols = c.request(hp.VolumeList(id=0))
        assert isinstance(vols, hp.Volumes)
        assert "doomed-vol" not in [v.name for v in vols.volumes]
        c.request(hp.VmStop(id=0, name="doomed"))
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="doomed"))


def test_limits_survive_a_helper_restart(helper: HelperProcess) -> None:
    start(helper, "kept", "kept-vol", hp.TimeLimits(lifetime_s=30), network=None)
    t0 = time.monotonic()
    helper.kill9()  # QEMU lives on; the next helper adopts it with its limits
    helper.start()
    assert get(helper, "kept").time_limits == hp.TimeLimits(lifetime_s=30)
    info, t1 = wait_ended(helper, "kept", within=45)
    assert info.ended is not None and info.ended.limit == "lifetime"
    assert t1 - t0 <= 30 + 15
    assert helper.qemu_pids() == []
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="kept"))
        c.request(hp.VolumeDestroy(id=0, name="kept-vol"))


def test_a_request_in_flight_keeps_a_vm_in_use(helper: HelperProcess) -> None:
    start(helper, "slow", "slow-vol", hp.TimeLimits(idle_s=10), network=None)

    async def long_exec() -> bytes:
        # One silent request for twice the idle limit: the VM is in use.
        async with open_guest(str(helper.socket), "slow") as g:
            r = await g.exec(shell="sleep 22; echo done", timeout_s=60)
            return r.stdout

    assert anyio.run(long_exec) == b"done\n"
    assert get(helper, "slow").state == "running"
    info, _ = wait_ended(helper, "slow", within=30)  # idle once it returned
    assert info.ended is not None and info.ended.limit == "idle"
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="slow"))
        c.request(hp.VolumeDestroy(id=0, name="slow-vol"))
    assert helper.qemu_pids() == []
