"""Issue 5's acceptance through the product path: two real VMs started by the
real helper (in a network namespace this test made), their network set up by
the helper and configured in the guest by the agent, policies and forwards
changed over the helper protocol.

An "internet" is a second namespace routed behind the helper's, with small
servers in it.  Probes run inside the guests (tests/harness/netns.py,
uploaded through the relay).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.privhelper.net.store import STATE_FILE_NAME
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import Conflict
from tests.harness import netns as netns_mod
from tests.harness.images import skip_unless_image
from tests.harness.netns import NetNs, netns, uplink
from tests.support.helper_process import IMAGES, HelperProcess, running_helper

INTERNET = "198.51.100.2"
HOST_UPLINK = "198.51.100.1"
ALLOWED = "203.0.113.5"
PROBE = "/root/probe.py"
pytestmark = skip_unless_image("minimal")


@dataclass
class Lab:
    helper: HelperProcess
    host: NetNs
    internet: NetNs
    addr: dict[str, str]

    def client(self) -> BlockingHelperClient:
        return BlockingHelperClient(str(self.helper.socket), timeout=180)

    def sh(self, vm: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        async def run() -> tuple[int, str]:
            async with open_guest(str(self.helper.socket), vm) as g:
                r = await g.exec(shell=cmd, timeout_s=timeout)
                out = (r.stdout + r.stderr).decode(errors="replace").strip()
                return (r.exit_code if r.exit_code is not None else -1), out

        return anyio.run(run)

    def tcp(self, vm: str, host: str, port: int, *extra: str) -> str | None:
        rc, out = self.sh(vm, f"python3 {PROBE} tcp {host} {port} 3 {' '.join(extra)}")
        return out if rc == 0 else None

    def ping(self, vm: str, host: str) -> bool:
        return self.sh(vm, f"python3 {PROBE} ping {host} 2")[0] == 0

    def policy(self, vm: str, **kw: object) -> hp.VmInfo:
        with self.client() as c:
            policy = hp.NetworkPolicy(**kw)  # type: ignore[arg-type]
            info = c.request(hp.VmNetworkSet(id=0, name=vm, policy=policy))
        assert isinstance(info, hp.VmInfo)
        return info


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    probe = Path(netns_mod.__file__).read_bytes()
    with (
        # The "internet" is on the host's uplink network, which the default
        # blocks as one of the host's own: exempt it, as an operator would.
        running_helper(
            group=0,
            extra_args=("--images-dir", str(IMAGES)),
            config='[net]\nexempt = ["198.51.100.0/24"]\n',
        ) as helper,
        netns("aihn") as internet,
    ):
        host = NetNs(helper.netns)
        uplink(host, internet, host_addr=HOST_UPLINK, net_addr=INTERNET, prefix=24,
               extra=[ALLOWED])
        internet.serve("internet", 80, 8443)
        addr = {}
        with BlockingHelperClient(str(helper.socket), timeout=180) as c:
            for vm in ("a", "b"):
                c.request(hp.VolumeCreate(id=0, name=vm, source=hp.FromImage(image="minimal")))
                info = c.request(hp.VmStart(id=0, name=vm, volume=vm, memory_mib=192))
                assert isinstance(info, hp.VmInfo) and info.network is not None
                addr[vm] = info.network.address

        async def setup(vm: str) -> None:
            async with open_guest(str(helper.socket), vm) as g:
                await g.upload_bytes(probe, PROBE)
                await g.job_start(shell=f"python3 {PROBE} serve {vm} 80")

        for vm in ("a", "b"):
            anyio.run(setup, vm)
        lab = Lab(helper=helper, host=host, internet=internet, addr=addr)
        for vm in ("a", "b"):
            for _ in range(30):
                if lab.tcp(vm, "127.0.0.1", 80) == vm:
                    break
            else:
                raise AssertionError(f"the server in {vm} did not start")
        try:
            yield lab
        finally:
            host.stop_procs()


@pytest.fixture
def fresh(lab: Lab) -> Lab:
    for vm in ("a", "b"):
        lab.policy(vm)
    return lab


def test_guest_network_is_configured_by_the_helper(fresh: Lab) -> None:
    rc, out = fresh.sh("a", "ip -o addr show eth0; ip route; hostname")
    assert rc == 0 and f"{fresh.addr['a']}/16" in out and "default via 10.42.0.1" in out
    assert out.splitlines()[-1] == "a"
    assert fresh.ping("a", "10.42.0.1")


def test_vms_are_isolated_by_default_and_can_be_peered(fresh: Lab) -> None:
    a, b = fresh.addr["a"], fresh.addr["b"]
    assert fresh.tcp("a", b, 80) is None
    assert not fresh.ping("a", b)
    assert fresh.tcp("b", a, 80) is None
    info = fresh.policy("a", peers=["b"])
    assert info.network is not None and info.network.policy.peers == ["b"]
    assert fresh.tcp("a", b, 80) == "b"
    assert fresh.ping("b", a)


def test_egress_only_when_allowed_and_only_to_the_allow_list(fresh: Lab) -> None:
    assert fresh.tcp("a", INTERNET, 80) is None
    fresh.policy("a", egress=True)
    assert fresh.tcp("a", INTERNET, 80) == "internet"
    rule = hp.AllowRule(cidr=f"{ALLOWED}/32", ports=[hp.PortRange(80, 80)])
    fresh.policy("a", egress=True, allow=[rule])
    assert fresh.tcp("a", ALLOWED, 80) == "internet"
    assert fresh.tcp("a", ALLOWED, 8443) is None
    assert fresh.tcp("a", INTERNET, 80) is None
    assert fresh.tcp("b", INTERNET, 80) is None  # b's policy is its own


def test_spoofed_source_address_is_dropped(fresh: Lab) -> None:
    fresh.policy("a", egress=True)
    assert fresh.sh("a", "ip addr add 10.42.0.99/32 dev eth0")[0] == 0
    try:
        assert fresh.tcp("a", INTERNET, 80, "--src", "10.42.0.99") is None
    finally:
        fresh.sh("a", "ip addr del 10.42.0.99/32 dev eth0")
    assert fresh.tcp("a", INTERNET, 80) == "internet"


def test_forward_reaches_the_guest_from_the_hosts_localhost(fresh: Lab) -> None:
    with fresh.client() as c:
        info = c.request(hp.ForwardAdd(id=0, vm="a", host_port=18080, guest_port=80))
        assert isinstance(info, hp.VmInfo) and info.network is not None
        assert [(f.host_port, f.guest_port) for f in info.network.forwards] == [(18080, 80)]
        with pytest.raises(Conflict):  # the same host port twice
            c.request(hp.ForwardAdd(id=0, vm="b", host_port=18080, guest_port=80))
        curl = fresh.host.run("curl", "-s", "--http0.9", "-m", "10", "http://127.0.0.1:18080/")
        assert curl.stdout.strip() == "a"
        c.request(hp.ForwardRemove(id=0, vm="a", host_port=18080))
    curl = fresh.host.run("curl", "-s", "-m", "3", "http://127.0.0.1:18080/", check=False)
    assert curl.returncode != 0


def test_privileged_and_busy_ports_are_refused(fresh: Lab) -> None:
    from agentiso.protocol.errors import RemoteError

    with fresh.client() as c:
        with pytest.raises(RemoteError) as info:
            c.request(hp.ForwardAdd(id=0, vm="a", host_port=80, guest_port=80))
        assert info.value.code in ("invalid", "permission_denied")
        busy = fresh.host.spawn(
            "python3", "-c",
            "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 18099)); "
            "s.listen(); print('ready', flush=True); time.sleep(60)",
        )
        assert busy.stdout is not None and busy.stdout.readline().strip() == "ready"
        with pytest.raises(Conflict):
            c.request(hp.ForwardAdd(id=0, vm="a", host_port=18099, guest_port=80))
        busy.kill()


def test_stopping_a_vm_leaves_nothing_of_its_network(fresh: Lab) -> None:
    with fresh.client() as c:
        c.request(hp.ForwardAdd(id=0, vm="a", host_port=18081, guest_port=80))
        info = c.request(hp.VmGet(id=0, name="a"))
        assert isinstance(info, hp.VmInfo) and info.network is not None
        mac, addr = info.network.mac, info.network.address
        c.request(hp.VmStop(id=0, name="a"))
    links = fresh.host.ip("-o", "link")
    ruleset = fresh.host.run("nft", "list", "ruleset").stdout
    for needle in (mac, addr, "18081"):
        assert needle not in links and needle not in ruleset, needle
    state = json.loads((fresh.helper.state_dir / STATE_FILE_NAME).read_text())
    assert addr not in json.dumps(state)  # the address went back to the pool
    assert fresh.ping("b", "10.42.0.1")  # b unaffected
