"""The warm pool through the real helper (privhelper/vms/pool.py).

A helper with ``[pool]`` of two VMs of the default shape: it builds the
template, then resumes two pool VMs from it, each of which runs a warm-up
command.  Checked: a fresh volume's ``VmStart`` takes a pool VM over (the
agent's uptime is older than the create), for two users, with identities
that differ (address, MAC, hostname, machine-id, /dev/urandom) and rules
handed over (the host reaches a1's inbound port, b1 does not reach it); no
user's listing, root's included, shows a pool VM or volume; the pool
refills; a start that no pool VM fits (another disk size) goes on without
the pool; a pool VM killed during its take-over is discarded whole and the
start still succeeds (from the template); a helper restart keeps the pool
VMs and uses them; a changed image is never served by a pool VM of the
stale template, which the pool drops.

Real QEMU (TCG), the real image and agent, in the namespace the helper
harness made; one helper for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.privhelper.vms.pool import NAME_PREFIX
from agentiso.privhelper.vms.templates import POOL_OWNER
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness import netns as netns_mod
from tests.harness.images import pin_image, skip_unless_image
from tests.harness.netns import NetNs
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper

pytestmark = skip_unless_image("minimal")

USER_A, USER_B = 61011, 61012
PORT = 80
PROBE = "/root/probe.py"
POLICY = hp.NetworkPolicy(inbound_ports=[PORT])
CONFIG = ("[limits]\nper_uid_memory_mib = 4096\nper_uid_vms = 8\n"
          "[templates]\nbuild = \"on-miss\"\nshare_memory = true\n"
          "[pool]\nmemory_mib = 512\n[[pool.shapes]]\nimage = \"minimal\"\ncount = 2\n")
POOL_WAIT_S = 300.0


@dataclass
class Lab:
    helper: HelperProcess
    images: Path
    host: NetNs
    info: dict[str, hp.VmInfo] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)
    create_s: dict[str, float] = field(default_factory=dict)

    def client(self) -> BlockingHelperClient:
        return BlockingHelperClient(str(self.helper.socket), timeout=300)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The helper's log events called ``name``, every incarnation's."""
        out = []
        for line in self.helper.log().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == name:
                out.append(ev)
        return out

    def count(self, name: str) -> int:
        return len(self.events(name))

    def registry(self) -> dict[str, Any]:
        path = self.helper.state_dir / "registry.json"
        if not path.exists():  # nothing made yet
            return {"vms": [], "volumes": []}
        data: dict[str, Any] = json.loads(path.read_bytes())
        return data

    def net_workspaces(self) -> set[str]:
        """The VM keys the network layer holds a TAP, address and rules for."""
        data = json.loads((self.helper.state_dir / "net.json").read_bytes())
        return set(data.get("workspaces", {}))

    def pool_vms(self) -> dict[str, str]:
        """The pool's VMs now: registry key -> name."""
        return {m["key"]: m["name"] for m in self.registry()["vms"] if m["owner"] == POOL_OWNER}

    def wait_pool(self, n: int) -> set[str]:
        """Wait until ``n`` pool VMs are filled and warm; their keys."""
        deadline = time.monotonic() + POOL_WAIT_S
        while time.monotonic() < deadline:
            filled = {e["vm"] for e in self.events("pool_filled")} & set(self.pool_vms())
            if len(filled) >= n:
                return filled
            time.sleep(0.5)
        raise AssertionError(f"no {n} pool VMs within {POOL_WAIT_S} s:\n"
                             f"{self.helper.log()[-3000:]}")

    def sh(self, vm: str, cmd: str, check: bool = True) -> str:
        async def run() -> str:
            async with open_guest(str(self.helper.socket), vm, owner=self.owner[vm]) as g:
                r = await g.exec(shell=cmd, timeout_s=60)
                assert not check or r.exit_code == 0, (vm, cmd, r)
                return r.stdout.decode().strip()

        return anyio.run(run)

    def create(self, vm: str, owner: int) -> hp.VmInfo:
        """Volume from the image and a VM on it, timed to the first exec."""
        t0 = time.monotonic()
        with self.client() as c:
            c.request(hp.VolumeCreate(id=0, name=f"{vm}-vol", owner=owner,
                                      source=hp.FromImage(image="minimal")))
            info = c.request(hp.VmStart(id=0, name=vm, volume=f"{vm}-vol", network=POLICY,
                                        owner=owner))
        assert isinstance(info, hp.VmInfo) and info.state == "running", info
        self.info[vm], self.owner[vm] = info, owner
        self.sh(vm, "true")
        self.create_s[vm] = time.monotonic() - t0
        return info

    def stop(self, vm: str) -> None:
        with self.client() as c:
            c.request(hp.VmStop(id=0, name=vm, owner=self.owner[vm], force=True))

    def address(self, vm: str) -> str:
        net = self.info[vm].network
        assert net is not None
        return net.address


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    images = public_tmpdir("agentiso-pool-img-")  # a rebuild cannot change it under us
    try:
        pin_image(IMAGES / "minimal", images / "minimal")
        with running_helper(group=0, extra_args=("--images-dir", str(images)),
                            config=CONFIG) as helper:
            lab = Lab(helper=helper, images=images, host=NetNs(helper.netns))
            lab.wait_pool(2)
            lab.create("a1", USER_A)
            lab.create("b1", USER_B)
            print("create -> first exec (s):", {k: round(v, 3) for k, v in lab.create_s.items()})
            yield lab
    finally:
        shutil.rmtree(images, ignore_errors=True)


def test_starts_of_fresh_volumes_take_pool_vms_over(lab: Lab) -> None:
    assert lab.count("pool_taken_over") == 2
    for vm in ("a1", "b1"):
        uptime = float(lab.sh(vm, "cut -d' ' -f1 /proc/uptime"))
        assert uptime > lab.create_s[vm], (vm, uptime)  # resumed, not booted
        with lab.client() as c:
            info = c.request(hp.VmGet(id=0, name=vm, owner=lab.owner[vm]))
            vol = c.request(hp.VolumeGet(id=0, name=f"{vm}-vol", owner=lab.owner[vm]))
        assert isinstance(info, hp.VmInfo) and isinstance(vol, hp.VolumeInfo)
        assert info.volume == f"{vm}-vol" and info.state == "running"
        assert vol.name == f"{vm}-vol"


def test_two_taken_over_differ_in_identity(lab: Lab) -> None:
    seen: dict[str, set[str]] = {k: set() for k in ("addr", "mac", "host", "mid", "rand")}
    for vm in ("a1", "b1"):
        net = lab.info[vm].network
        assert net is not None
        out = lab.sh(vm, "hostname; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1"
                         " | tr -d ' \\n'; echo; ip -o link show eth0; ip -o -4 addr show eth0"
                     ).splitlines()
        hostname, machine_id, rand, link, addr = out
        assert hostname == vm
        assert net.mac in link.lower() and f"inet {net.address}/" in addr, (vm, link, addr)
        assert len(machine_id) == 32 and len(rand) == 64
        for k, v in (("addr", net.address), ("mac", net.mac), ("host", hostname),
                     ("mid", machine_id), ("rand", rand)):
            seen[k].add(v)
    assert all(len(s) == 2 for s in seen.values()), seen


def test_no_listing_shows_the_pool(lab: Lab) -> None:
    with lab.client() as c:
        for owner in (0, USER_A, USER_B):
            vms = c.request(hp.VmList(id=0, owner=owner))
            vols = c.request(hp.VolumeList(id=0, owner=owner))
            assert isinstance(vms, hp.Vms) and isinstance(vols, hp.Volumes)
            names = [v.name for v in vms.vms] + [v.name for v in vols.volumes]
            assert not [n for n in names if n.startswith(NAME_PREFIX)], (owner, names)
            if owner == USER_A:
                assert {v.name for v in vms.vms} == {"a1"}


def test_the_rules_are_the_new_owners(lab: Lab) -> None:
    probe = Path(netns_mod.__file__).read_bytes()

    async def setup() -> None:
        for vm in ("a1", "b1"):
            async with open_guest(str(lab.helper.socket), vm, owner=lab.owner[vm]) as g:
                await g.upload_bytes(probe, PROBE)
                if vm == "a1":
                    await g.job_start(shell=f"python3 {PROBE} serve banner {PORT}")

    anyio.run(setup)
    a1 = lab.address("a1")
    for _ in range(60):  # the host reaches a1's inbound port (a1's policy)
        if lab.host.probe("tcp", a1, str(PORT), "3").returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the server in a1 is not reachable from the host")
    reach = f"python3 {PROBE} tcp {a1} {PORT} 3 && echo reached || echo blocked"
    assert lab.sh("b1", reach, check=False).splitlines()[-1] == "blocked"


def test_the_pool_refills(lab: Lab) -> None:
    taken = {lab.info[vm].name for vm in ("a1", "b1")}
    filled = lab.wait_pool(2)
    assert len(filled) == 2 and not taken & set(lab.pool_vms().values())


def test_a_start_no_pool_vm_fits_goes_on_without_the_pool(lab: Lab) -> None:
    lab.wait_pool(2)
    taken, claims = lab.count("pool_taken_over"), lab.count("template_claimed")
    with lab.client() as c:  # a disk larger than the image's: no pool VM has one
        probe = c.request(hp.VolumeCreate(id=0, name="probe", owner=USER_B,
                                          source=hp.FromImage(image="minimal")))
        assert isinstance(probe, hp.VolumeInfo)
        c.request(hp.VolumeDestroy(id=0, name="probe", owner=USER_B))
        c.request(hp.VolumeCreate(id=0, name="big-vol", owner=USER_B,
                                  source=hp.FromImage(image="minimal"),
                                  size_bytes=probe.size_bytes + (1 << 30)))
        info = c.request(hp.VmStart(id=0, name="big", volume="big-vol", network=POLICY,
                                    owner=USER_B))
    assert isinstance(info, hp.VmInfo) and info.state == "running", info
    lab.info["big"], lab.owner["big"] = info, USER_B
    assert lab.sh("big", "hostname") == "big"
    assert lab.count("pool_taken_over") == taken  # booted cold: no pool VM, no template
    assert lab.count("template_claimed") == claims
    assert len(lab.pool_vms()) == 2  # the pool is untouched
    lab.stop("big")


def test_a_pool_vm_killed_during_its_takeover_leaves_nothing(lab: Lab) -> None:
    pool = lab.wait_pool(2)
    pids = {k: qemu_pid(k) for k in pool}
    pool_disks = {m["volume_key"] for m in lab.registry()["vms"] if m["key"] in pids}
    for pid in pids.values():  # frozen: the take-over waits on them
        os.kill(pid, signal.SIGSTOP)
    failed = lab.count("pool_takeover_failed")
    outcome: dict[str, Any] = {}

    def start() -> None:
        try:
            outcome["info"] = lab.create("k1", USER_A)
        except Exception as exc:
            outcome["error"] = exc

    t = threading.Thread(target=start)
    t.start()
    deadline = time.monotonic() + 30
    while not any(m["name"] == "k1" for m in lab.registry()["vms"]):
        assert time.monotonic() < deadline, "the take-over never began"
        time.sleep(0.02)
    time.sleep(0.5)  # well into the take-over: waiting on the frozen QEMU
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    t.join(180)
    assert "info" in outcome, outcome  # the start succeeded without the pool
    assert lab.count("pool_takeover_failed") == failed + 1
    assert lab.sh("k1", "hostname") == "k1"
    # Nothing of the killed pool VMs stays: VM, volume, TAP, address, rules.
    deadline = time.monotonic() + 60
    while set(lab.pool_vms()) & set(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    reg = lab.registry()
    assert not {m["key"] for m in reg["vms"]} & set(pids)
    assert [v["name"] for v in reg["volumes"] if v["owner"] == USER_A].count("k1-vol") == 1
    assert len(pool_disks) == 2 and not {v["key"] for v in reg["volumes"]} & pool_disks
    assert not lab.net_workspaces() & set(pids)
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()
    lab.stop("k1")


def qemu_pid(key: str) -> int:
    """The QEMU of VM ``key`` (its ``-name guest=agentiso-<key>``)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"guest=agentiso-{key}".encode()) for a in argv):
            return int(d.name)
    raise AssertionError(f"no QEMU of {key}")


def test_a_helper_restart_keeps_the_pool_and_uses_it(lab: Lab) -> None:
    pool = lab.wait_pool(2)
    fills, dropped = lab.count("pool_filled"), lab.count("pool_dropped")
    taken = lab.count("pool_taken_over")
    lab.helper.stop()
    lab.helper.start(30)
    assert set(lab.pool_vms()) == pool  # adopted, not lost
    lab.create("r1", USER_B)
    assert lab.count("pool_taken_over") == taken + 1
    assert lab.info["r1"].name == "r1"
    lab.wait_pool(2)  # one made for the one taken, none for the kept
    assert lab.count("pool_filled") == fills + 1
    assert lab.count("pool_dropped") == dropped
    lab.stop("r1")


def test_a_changed_image_is_not_served_by_the_stale_pool(lab: Lab) -> None:
    old = lab.wait_pool(2)
    manifest = lab.images / "minimal" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["rootfs.img"]["sha256"] = "1" * 64
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(manifest)
    taken = lab.count("pool_taken_over")
    lab.create("c1", USER_A)
    assert lab.count("pool_taken_over") == taken  # not from the stale pool
    deadline = time.monotonic() + POOL_WAIT_S
    while set(lab.pool_vms()) & old and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(lab.pool_vms()) & old  # the stale pool VMs are dropped
    lab.stop("c1")
