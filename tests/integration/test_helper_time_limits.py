"""Time limits through the real helper: real QEMU (TCG), the real guest, no
frontend.  A limit fires with no client connected; the VM's record then says
why (state ``stopped``, ``ended``, ``reason``) until the next VmStop or a
VmStart of its name; everything it held is released (QEMU, TAP, rules, its
address, and with ``destroy`` its volume).

Most of this module is waiting for timers, so its scenarios run at once,
each on its own VM, in threads started by one module fixture; each test then
reports its own scenario.  The restart scenario kills its helper, so it has
a helper of its own.  Deadlines count from the VM's ``created`` time, not
from when the (possibly slow, contended) boot returned."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.privhelper.net.store import STATE_FILE_NAME
from agentiso.privhelper.vm.procfs import is_same_process, read_stat
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import NotFound
from tests.harness.images import skip_unless_image
from tests.support.helper_process import IMAGES, HelperProcess, running_helper

GROUP = 64351
DEFAULT_POLICY = hp.NetworkPolicy()
pytestmark = skip_unless_image("minimal")


SCENARIO_TIMEOUT = 240  # seconds a test waits for its scenario (all run at once)


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    with running_helper(group=GROUP, extra_args=("--images-dir", str(IMAGES))) as h:
        yield h


@pytest.fixture(scope="module")
def restart_helper() -> Iterator[HelperProcess]:
    """A helper of its own for the scenario that kills its helper."""
    with running_helper(group=GROUP, extra_args=("--images-dir", str(IMAGES))) as h:
        yield h


def client(helper: HelperProcess) -> BlockingHelperClient:
    return BlockingHelperClient(str(helper.socket), timeout=180)


def qemu_of(helper: HelperProcess, vm: str) -> tuple[int, int]:
    """``vm``'s QEMU as (pid, start time), from the admin listing (tests run as root)."""
    with client(helper) as c:
        listing = c.request(hp.AdminList(id=0))
    assert isinstance(listing, hp.AdminListing)
    (pid,) = [v.pid for v in listing.vms if v.name == vm and v.pid]
    st = read_stat(pid)
    assert st is not None, f"{vm}'s QEMU {pid} is not running"
    return pid, st.start_time


def qemu_gone(qemu: tuple[int, int]) -> bool:
    return not is_same_process(*qemu)


def since_created(info: hp.VmInfo) -> float:
    """Seconds since ``info``'s VM started (its limits count from then)."""
    return time.time() - info.created


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
    """Poll (VmGet is no activity) until a limit ended ``vm``; its info and
    when (``time.time()``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        info = get(helper, vm)
        if info.ended is not None:
            return info, time.time()
        time.sleep(0.5)
    raise AssertionError(f"{vm} was not ended within {within} s: {get(helper, vm)}")


def links(helper: HelperProcess) -> str:
    return subprocess.run(["ip", "-n", helper.netns, "-o", "link"], capture_output=True,
                          text=True, check=True).stdout


def nothing_left_of(helper: HelperProcess, info: hp.VmInfo, qemu: tuple[int, int]) -> None:
    assert qemu_gone(qemu)
    assert info.network is not None
    ruleset = subprocess.run(["ip", "netns", "exec", helper.netns, "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=True).stdout
    for needle in (info.network.mac, info.network.address):
        assert needle not in links(helper) and needle not in ruleset, needle
    state = json.loads((helper.state_dir / STATE_FILE_NAME).read_text())
    assert info.network.address not in json.dumps(state)  # back in the pool


def named(vms: list[hp.VmInfo], name: str) -> list[tuple[str, str, str]]:
    return [(v.name, v.state, v.reason) for v in vms if v.name == name]


# --- the scenarios (each on its own VM; run at once by the fixture below) --------------------


def idle_timeout(helper: HelperProcess) -> None:
    started = start(helper, "idler", "idler-vol", hp.TimeLimits(idle_s=15))
    qemu = qemu_of(helper, "idler")
    t0 = time.time()
    # No client from here on: only looks (VmGet), which are no activity.
    info, t1 = wait_ended(helper, "idler", within=60)
    assert 14 <= t1 - t0 <= 30, t1 - t0
    assert info.state == "stopped" and info.reason == "idle for 15 s (time limit)"
    assert info.ended is not None and info.ended.limit == "idle"
    assert info.ended.action == "stop" and info.ended.at <= time.time()
    assert info.network is None and info.expires_at is None
    assert info.time_limits == hp.TimeLimits(idle_s=15) and info.volume == "idler-vol"
    with client(helper) as c:
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and named(vms.vms, "idler") == [
            ("idler", "stopped", "idle for 15 s (time limit)")
        ]
        vol = c.request(hp.VolumeGet(id=0, name="idler-vol"))  # kept, and free
        assert isinstance(vol, hp.VolumeInfo) and vol.vm is None
    nothing_left_of(helper, started, qemu)
    # A VmStart of the same name replaces the record; VmStop then stops it.
    again = start(helper, "idler", "idler-vol", hp.TimeLimits(lifetime_s=600))
    assert again.reason == ""
    qemu = qemu_of(helper, "idler")
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="idler"))
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="idler"))
        c.request(hp.VolumeDestroy(id=0, name="idler-vol"))
    assert qemu_gone(qemu)


def traffic_then_lifetime(helper: HelperProcess) -> None:
    started = start(helper, "busy", "busy-vol", hp.TimeLimits(idle_s=10, lifetime_s=40),
                    network=None)
    qemu = qemu_of(helper, "busy")

    async def traffic(until: float) -> None:
        # One guest session, opened once: from then on only relayed requests.
        async with open_guest(str(helper.socket), "busy") as g:
            while since_created(started) < until:
                r = await g.exec(shell="echo hi")
                assert r.exit_code == 0 and r.stdout == b"hi\n"
                await anyio.sleep(2)

    anyio.run(traffic, 28)
    info = get(helper, "busy")
    assert info.state == "running" and info.ended is None  # 28 s > 10 s idle limit
    with pytest.raises(Exception):  # noqa: B017 - the channel ends with the VM
        anyio.run(traffic, 120)
    info, t1 = wait_ended(helper, "busy", within=30)
    assert info.ended is not None and info.ended.limit == "lifetime"
    assert info.reason == "lifetime of 40 s reached (time limit)"
    assert t1 - started.created <= 40 + 15
    assert qemu_gone(qemu)
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="busy"))  # forgets the record
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="busy"))
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and named(vms.vms, "busy") == []
        with pytest.raises(NotFound):
            c.request(hp.VmStop(id=0, name="busy"))
        c.request(hp.VolumeDestroy(id=0, name="busy-vol"))


def destroy_action(helper: HelperProcess) -> None:
    start(helper, "doomed", "doomed-vol", hp.TimeLimits(lifetime_s=10, action="destroy"),
          network=None)
    qemu = qemu_of(helper, "doomed")
    info, _ = wait_ended(helper, "doomed", within=60)
    assert info.state == "stopped" and info.ended is not None
    assert info.ended.action == "destroy" and info.ended.limit == "lifetime"
    assert "destroyed" in info.reason and info.volume == "doomed-vol"
    assert qemu_gone(qemu)
    with client(helper) as c:
        with pytest.raises(NotFound):
            c.request(hp.VolumeGet(id=0, name="doomed-vol"))
        vols = c.request(hp.VolumeList(id=0))
        assert isinstance(vols, hp.Volumes)
        assert "doomed-vol" not in [v.name for v in vols.volumes]
        c.request(hp.VmStop(id=0, name="doomed"))
        with pytest.raises(NotFound):
            c.request(hp.VmGet(id=0, name="doomed"))


def survives_restart(helper: HelperProcess) -> None:
    started = start(helper, "kept", "kept-vol", hp.TimeLimits(lifetime_s=30), network=None)
    helper.kill9()  # QEMU lives on; the next helper adopts it with its limits
    helper.start()
    assert get(helper, "kept").time_limits == hp.TimeLimits(lifetime_s=30)
    info, t1 = wait_ended(helper, "kept", within=60)
    assert info.ended is not None and info.ended.limit == "lifetime"
    assert t1 - started.created <= 30 + 15
    assert helper.qemu_pids() == []  # this helper holds no other VM
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="kept"))
        c.request(hp.VolumeDestroy(id=0, name="kept-vol"))


def in_flight_is_use(helper: HelperProcess) -> None:
    start(helper, "slow", "slow-vol", hp.TimeLimits(idle_s=10), network=None)
    qemu = qemu_of(helper, "slow")

    async def long_exec() -> bytes:
        # One silent request for twice the idle limit: the VM is in use.
        async with open_guest(str(helper.socket), "slow") as g:
            r = await g.exec(shell="sleep 22; echo done", timeout_s=60)
            return r.stdout

    assert anyio.run(long_exec) == b"done\n"
    assert get(helper, "slow").state == "running"
    info, _ = wait_ended(helper, "slow", within=40)  # idle once it returned
    assert info.ended is not None and info.ended.limit == "idle"
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="slow"))
        c.request(hp.VolumeDestroy(id=0, name="slow-vol"))
    assert qemu_gone(qemu)


Scenario = Callable[[HelperProcess], None]
Running = dict[Scenario, Future[None]]


@pytest.fixture(scope="module")
def scenarios(
    helper: HelperProcess, restart_helper: HelperProcess,
) -> Iterator[Running]:
    """Every scenario, started at once; the pool's exit waits for them all."""
    shared: list[Scenario] = [traffic_then_lifetime, in_flight_is_use, idle_timeout,
                              destroy_action]
    with ThreadPoolExecutor(max_workers=len(shared) + 1) as pool:
        running = {s: pool.submit(s, helper) for s in shared}
        running[survives_restart] = pool.submit(survives_restart, restart_helper)
        yield running


def test_idle_timeout_stops_a_vm_with_no_client_and_says_why(scenarios: Running) -> None:
    scenarios[idle_timeout].result(timeout=SCENARIO_TIMEOUT)


def test_traffic_keeps_a_vm_alive_but_its_lifetime_ends_it(scenarios: Running) -> None:
    scenarios[traffic_then_lifetime].result(timeout=SCENARIO_TIMEOUT)


def test_destroy_removes_the_volume_too(scenarios: Running) -> None:
    scenarios[destroy_action].result(timeout=SCENARIO_TIMEOUT)


def test_limits_survive_a_helper_restart(scenarios: Running) -> None:
    scenarios[survives_restart].result(timeout=SCENARIO_TIMEOUT)


def test_a_request_in_flight_keeps_a_vm_in_use(scenarios: Running) -> None:
    scenarios[in_flight_is_use].result(timeout=SCENARIO_TIMEOUT)


def test_no_vm_outlives_the_scenarios(
    scenarios: Running, helper: HelperProcess,
    restart_helper: HelperProcess,
) -> None:
    for s in scenarios.values():
        s.exception(timeout=SCENARIO_TIMEOUT)  # each test above reports its own failure
    assert helper.qemu_pids() == [] and restart_helper.qemu_pids() == []
