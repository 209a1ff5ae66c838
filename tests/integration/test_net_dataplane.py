"""The network layer end to end, for real, inside namespaces the test creates.

Topology (every box is a network namespace made by the fixture)::

    [guest a] eth0 -veth- ai-0a2a0002 \
                                     br-agentiso 10.42.0.1/16 [host] uplink0 -veth- [internet]
    [guest b] eth0 -veth- ai-0a2a0003 /                 198.51.100.1/24   198.51.100.2/24
                                                                          + 203.0.113.5, .77

The code under test (NetworkManager: pyroute2, nft, sysctls) runs in this
process with its thread moved into the "host" namespace.  Guests are
namespaces behind veth pairs named like the TAPs (a TAP needs QEMU on its other
end; real TAP creation is tested in test_net_tap.py).  The internet namespace
has no route back to 10.42.0.0/16, so its replies arrive only through the
host's masquerade.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentiso.privhelper.net.config import NetConfig, parse_net_config
from agentiso.privhelper.net.errors import InvalidNetInput, PortUnavailable
from agentiso.privhelper.net.manager import NetworkManager
from agentiso.privhelper.net.model import AllowRule, Forward, NetPolicy, PortRange
from tests.harness.netns import NetNs, NetnsUnavailable, netns, uplink, veth_guest

FAIL_TIMEOUT = "0.7"
OK_TIMEOUT = "5"
INTERNET = "198.51.100.2"
HOST_UPLINK = "198.51.100.1"
ALLOWED = "203.0.113.5"
OTHER = "203.0.113.77"


class InHost:
    """Calls the manager's methods with the thread inside the host namespace."""

    def __init__(self, mgr: NetworkManager, host: NetNs) -> None:
        self.mgr = mgr
        self.host = host

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self.mgr, name)
        if not callable(attr):
            return attr  # type: ignore[no-any-return]

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.host.entered():
                return attr(*args, **kwargs)

        return call


class Lab:
    def __init__(self, host: NetNs, a: NetNs, b: NetNs, net: NetNs, mgr: InHost) -> None:
        self.host, self.a, self.b, self.net, self.mgr = host, a, b, net, mgr

    def reset(self) -> None:
        for name in ("a", "b"):
            ws = self.mgr.mgr.state.workspaces.get(name)
            if ws is None:
                continue
            for f in ws.forwards:
                self.mgr.remove_forward(name, f.host_port, f.protocol)
            self.mgr.set_policy(name, NetPolicy())


def tcp_ok(ns: NetNs, host: str, port: int, *extra: str) -> str | None:
    """The banner if a TCP connection succeeds, None if it fails."""
    r = ns.probe("tcp", host, str(port), OK_TIMEOUT if not extra else FAIL_TIMEOUT, *extra)
    return r.stdout.strip() if r.returncode == 0 else None


def tcp_blocked(ns: NetNs, host: str, port: int, *extra: str) -> bool:
    return ns.probe("tcp", host, str(port), FAIL_TIMEOUT, *extra).returncode != 0


def ping_ok(ns: NetNs, host: str, *extra: str) -> bool:
    return ns.probe("ping", host, "2", *extra).returncode == 0


def ping_blocked(ns: NetNs, host: str, *extra: str) -> bool:
    return ns.probe("ping", host, FAIL_TIMEOUT, *extra).returncode != 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        ctx = [netns("aih"), netns("aia"), netns("aib"), netns("aii")]
    except NetnsUnavailable as exc:
        pytest.skip(reason=str(exc))
    # The "internet" sits on the host's uplink network, which the default
    # blocks as one of the host's own: exempt it, as an operator would.
    settings = parse_net_config(NetConfig(exempt=(f"{INTERNET.rsplit('.', 1)[0]}.0/24",)))
    with ctx[0] as host, ctx[1] as ga, ctx[2] as gb, ctx[3] as net:
        mgr = InHost(NetworkManager(settings, tmp_path_factory.mktemp("netstate")), host)
        try:
            mgr.start()
            uplink(
                host,
                net,
                host_addr=HOST_UPLINK,
                net_addr=INTERNET,
                prefix=24,
                extra=[ALLOWED, OTHER],
            )
            for name, guest in (("a", ga), ("b", gb)):
                ws = mgr.reserve(name, 1000)
                veth_guest(
                    host,
                    guest,
                    ws.tap,
                    mac=ws.mac,
                    address=ws.address,
                    prefix=settings.prefixlen,
                    gateway=str(settings.gateway),
                )
                with host.entered():
                    mgr.mgr.links.enslave(ws.tap, settings.bridge)
                guest.serve(name, 80, 5353)
            net.serve("internet", 80, 8443)
            host.serve("hostsvc", 2222)
            yield Lab(host, ga, gb, net, mgr)
        finally:
            mgr.teardown()
            mgr.mgr.links.close()


@pytest.fixture
def fresh(lab: Lab) -> Iterator[Lab]:
    lab.reset()
    yield lab
    lab.reset()


def addr(lab: Lab, name: str) -> str:
    return lab.mgr.mgr.get(name).address


def test_workspaces_are_isolated_by_default(fresh: Lab) -> None:
    a, b = addr(fresh, "a"), addr(fresh, "b")
    assert tcp_blocked(fresh.a, b, 80)
    assert tcp_blocked(fresh.b, a, 80)
    assert ping_blocked(fresh.a, b)
    # The gateway answers pings (diagnostics) but its services are closed.
    assert ping_ok(fresh.a, "10.42.0.1")
    assert tcp_blocked(fresh.a, "10.42.0.1", 2222)
    # Egress is off by default.
    assert tcp_blocked(fresh.a, INTERNET, 80)
    assert ping_blocked(fresh.a, INTERNET)


def test_peers_opt_in(fresh: Lab) -> None:
    a, b = addr(fresh, "a"), addr(fresh, "b")
    fresh.mgr.set_policy("a", NetPolicy(peers=("b",)))  # same owner: one side is enough
    assert tcp_ok(fresh.a, b, 80) == "b"
    assert tcp_ok(fresh.b, a, 80) == "a"
    assert ping_ok(fresh.a, b)
    fresh.mgr.set_policy("a", NetPolicy())
    assert tcp_blocked(fresh.a, b, 80)


def test_group_opt_in(fresh: Lab) -> None:
    b = addr(fresh, "b")
    fresh.mgr.set_policy("a", NetPolicy(groups=("team",)))
    assert tcp_blocked(fresh.a, b, 80)
    fresh.mgr.set_policy("b", NetPolicy(groups=("team",)))
    assert tcp_ok(fresh.a, b, 80) == "b"
    assert ping_ok(fresh.b, addr(fresh, "a"))


def test_egress_on_reaches_the_internet_masqueraded(fresh: Lab) -> None:
    fresh.mgr.set_policy("a", NetPolicy(egress=True))
    assert tcp_ok(fresh.a, INTERNET, 80) == "internet"
    assert tcp_ok(fresh.a, ALLOWED, 8443) == "internet"
    assert ping_ok(fresh.a, OTHER)
    # b's policy is untouched, and egress does not open a path to b.
    assert tcp_blocked(fresh.b, INTERNET, 80)
    assert tcp_blocked(fresh.a, addr(fresh, "b"), 80)
    # Nor to the host's own services on its other addresses.
    assert tcp_blocked(fresh.a, HOST_UPLINK, 2222)


def test_the_hosts_own_networks_are_blocked_unless_exempt(fresh: Lab) -> None:
    exempting = fresh.mgr.mgr.settings
    fresh.mgr.mgr.settings = dataclasses.replace(exempting, exempt=())
    try:
        # An allow-list naming the host's LAN does not open it either.
        fresh.mgr.set_policy("a", NetPolicy(egress=True, allow=(AllowRule(cidr=INTERNET),
                                                                  AllowRule(cidr=ALLOWED))))
        assert tcp_blocked(fresh.a, INTERNET, 80)  # on the host's uplink network
        assert tcp_ok(fresh.a, ALLOWED, 8443) == "internet"  # beyond it: reachable
        fresh.mgr.set_policy("a", NetPolicy(egress=True))
        assert tcp_blocked(fresh.a, INTERNET, 80)
    finally:
        fresh.mgr.mgr.settings = exempting
        fresh.mgr.reapply()
    assert tcp_ok(fresh.a, INTERNET, 80) == "internet"


def test_allow_list_limits_egress(fresh: Lab) -> None:
    rule = AllowRule(cidr=f"{ALLOWED}/32", ports=(PortRange(80, 80),), protocol="tcp")
    fresh.mgr.set_policy("a", NetPolicy(egress=True, allow=(rule,)))
    assert tcp_ok(fresh.a, ALLOWED, 80) == "internet"
    assert tcp_blocked(fresh.a, ALLOWED, 8443)
    assert tcp_blocked(fresh.a, OTHER, 80)
    assert tcp_blocked(fresh.a, INTERNET, 80)
    assert ping_blocked(fresh.a, ALLOWED)
    wide = AllowRule(cidr="203.0.113.0/24")
    fresh.mgr.set_policy("a", NetPolicy(egress=True, allow=(wide,)))
    assert tcp_ok(fresh.a, OTHER, 8443) == "internet"
    assert ping_ok(fresh.a, OTHER)
    assert tcp_blocked(fresh.a, INTERNET, 80)


def test_spoofed_source_is_dropped(fresh: Lab) -> None:
    fresh.mgr.set_policy("a", NetPolicy(egress=True, peers=("b",)))
    b = addr(fresh, "b")
    assert tcp_ok(fresh.a, INTERNET, 80) == "internet"  # control
    fresh.a.ip("addr", "add", "10.42.0.99/32", "dev", "eth0")
    fresh.a.ip("addr", "add", "192.0.2.7/32", "dev", "eth0")
    try:
        for src in ("10.42.0.99", "192.0.2.7"):
            assert tcp_blocked(fresh.a, INTERNET, 80, "--src", src)
            assert tcp_blocked(fresh.a, b, 80, "--src", src)
            assert ping_blocked(fresh.a, "10.42.0.1", "--src", src)
    finally:
        fresh.a.ip("addr", "del", "10.42.0.99/32", "dev", "eth0")
        fresh.a.ip("addr", "del", "192.0.2.7/32", "dev", "eth0")
    # A forged MAC is dropped as well (ARP and IP alike).
    real_mac = fresh.mgr.mgr.get("a").mac
    fresh.a.ip("link", "set", "eth0", "address", "02:00:00:00:00:66")
    fresh.a.ip("neigh", "flush", "all")
    try:
        assert tcp_blocked(fresh.a, INTERNET, 80)
        assert tcp_blocked(fresh.a, b, 80)
    finally:
        fresh.a.ip("link", "set", "eth0", "address", real_mac)
    assert tcp_ok(fresh.a, INTERNET, 80) == "internet"


def test_arp_spoofing_does_not_poison_the_host(fresh: Lab) -> None:
    """a claims b's address by ARP; the host's neighbour entry for b stays b's."""
    fresh.mgr.set_policy("b", NetPolicy(inbound_ports=(80,)))
    b = fresh.mgr.mgr.get("b")
    a_mac = fresh.mgr.mgr.get("a").mac
    assert tcp_ok(fresh.host, b.address, 80) == "b"  # the host learns b's MAC
    bridge_mac = fresh.host.run("cat", "/sys/class/net/br-agentiso/address").stdout.strip()
    time.sleep(1.1)  # past the neighbour locktime (1 s), when a reply may override
    r = fresh.a.probe("arpspoof", "eth0", b.address, "10.42.0.1", bridge_mac)
    assert r.returncode == 0, r.stderr
    time.sleep(0.2)
    neigh = fresh.host.ip("neigh", "show", b.address)
    assert b.mac in neigh and a_mac not in neigh
    assert tcp_ok(fresh.host, b.address, 80) == "b"


def test_routed_hairpin_between_workspaces_is_blocked(fresh: Lab) -> None:
    """a sends to b through the gateway (routed, not bridged): still isolated,
    even with egress on (which must not count as a way to other workspaces)."""
    fresh.mgr.set_policy("a", NetPolicy(egress=True))
    b = addr(fresh, "b")
    count = fresh.b.udp_counter(9998)
    fresh.a.ip("route", "add", f"{b}/32", "via", "10.42.0.1")
    try:
        # One-way: b's answer would go straight back over the bridge and be
        # dropped there, so only a counter at b shows whether the host routed it.
        assert fresh.a.probe("udpsend", b, "9998").returncode == 0
        assert tcp_blocked(fresh.a, b, 80)
    finally:
        fresh.a.ip("route", "del", f"{b}/32")
    assert count() == 0


def test_impersonating_another_workspace_gets_nothing_out(fresh: Lab) -> None:
    """A sends with b's address while b may reach the internet: nothing leaves."""
    fresh.mgr.set_policy("a", NetPolicy(egress=True))
    fresh.mgr.set_policy("b", NetPolicy(egress=True))
    count = fresh.net.udp_counter(9999)
    b = addr(fresh, "b")
    assert fresh.a.probe("udpsend", INTERNET, "9999").returncode == 0
    assert count() == 3  # control: a's own address gets through
    fresh.a.ip("addr", "add", f"{b}/32", "dev", "eth0")
    try:
        assert fresh.a.probe("udpsend", INTERNET, "9999", "--src", b).returncode == 0
        assert tcp_blocked(fresh.a, INTERNET, 80, "--src", b)
    finally:
        fresh.a.ip("addr", "del", f"{b}/32", "dev", "eth0")
    assert count() == 3
    assert fresh.b.probe("udpsend", INTERNET, "9999").returncode == 0
    assert count() == 6  # b itself still can


def test_isolation_without_br_netfilter(fresh: Lab) -> None:
    """With bridged frames invisible to the inet table, the bridge table alone
    keeps workspaces apart and stops spoofing."""
    key = "net.bridge.bridge-nf-call-iptables"
    if fresh.host.run("sysctl", "-n", key, check=False).returncode != 0:
        pytest.skip(reason="no br_netfilter in this kernel: the default case already tests it")
    fresh.host.run("sysctl", "-w", f"{key}=0")
    try:
        b = addr(fresh, "b")
        assert tcp_blocked(fresh.a, b, 80)
        assert ping_blocked(fresh.a, b)
        fresh.mgr.set_policy("a", NetPolicy(peers=("b",)))
        assert tcp_ok(fresh.a, b, 80) == "b"
        fresh.a.ip("addr", "add", "10.42.0.98/32", "dev", "eth0")
        try:
            assert tcp_blocked(fresh.a, b, 80, "--src", "10.42.0.98")
        finally:
            fresh.a.ip("addr", "del", "10.42.0.98/32", "dev", "eth0")
    finally:
        fresh.host.run("sysctl", "-w", f"{key}=1")


def test_inbound_ports_from_the_host(fresh: Lab) -> None:
    a = addr(fresh, "a")
    assert tcp_blocked(fresh.host, a, 80)
    fresh.mgr.set_policy("a", NetPolicy(inbound_ports=(80,)))
    assert tcp_ok(fresh.host, a, 80) == "a"
    assert tcp_blocked(fresh.host, addr(fresh, "b"), 80)


def test_forwards_from_localhost_and_other_hosts(fresh: Lab) -> None:
    fresh.mgr.add_forward("a", Forward(host_port=18080, guest_port=80, external=True))
    fresh.mgr.add_forward("a", Forward(host_port=18053, guest_port=5353, protocol="udp"))
    fresh.mgr.add_forward("a", Forward(host_port=18081, guest_port=80))
    assert tcp_ok(fresh.host, HOST_UPLINK, 18081) == "a"  # from the host itself (root)
    assert tcp_blocked(fresh.net, HOST_UPLINK, 18081)  # not external: not from other hosts
    assert tcp_ok(fresh.host, "127.0.0.1", 18080) == "a"
    # The acceptance wording, literally: curl on the host (the server's banner is
    # a bare line, hence HTTP/0.9).
    curl = fresh.host.run("curl", "-s", "--http0.9", "-m", "5", "http://127.0.0.1:18080/")
    assert curl.stdout.strip() == "a"
    assert tcp_ok(fresh.host, HOST_UPLINK, 18080) == "a"
    assert tcp_ok(fresh.net, HOST_UPLINK, 18080) == "a"  # another host
    r = fresh.host.probe("udp", "127.0.0.1", "18053", OK_TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == "a:ping"
    # Guests cannot use forwards to reach each other.
    fresh.mgr.set_policy("b", NetPolicy(egress=True))
    assert tcp_blocked(fresh.b, HOST_UPLINK, 18080)
    # Refusals: privileged, already forwarded, in use on the host.
    with pytest.raises(InvalidNetInput):
        fresh.mgr.add_forward("a", Forward(host_port=80, guest_port=80))
    with pytest.raises(PortUnavailable):
        fresh.mgr.add_forward("b", Forward(host_port=18080, guest_port=80))
    with pytest.raises(PortUnavailable):
        fresh.mgr.add_forward("b", Forward(host_port=2222, guest_port=80))
    fresh.mgr.remove_forward("a", 18080)
    assert tcp_blocked(fresh.host, "127.0.0.1", 18080)


def test_restart_reapplies_and_gc_removes_strays(lab: Lab, tmp_path: Path) -> None:
    host = lab.host
    before = host.run("nft", "-j", "list", "table", "inet", "agentiso").stdout
    host.ip("tuntap", "add", "ai-deadbeef", "mode", "tap")  # a persistent leftover
    host.run("nft", "delete", "table", "inet", "agentiso")
    again = InHost(NetworkManager(lab.mgr.mgr.settings, lab.mgr.mgr.state_path.parent), host)
    try:
        report = again.start()
    finally:
        again.mgr.links.close()
    assert report.removed_links == ["ai-deadbeef"]
    after = host.run("nft", "-j", "list", "table", "inet", "agentiso").stdout
    assert _strip_handles(after) == _strip_handles(before)
    assert tcp_blocked(lab.a, addr(lab, "b"), 80)


def _strip_handles(text: str) -> list[Any]:
    objs = json.loads(text)["nftables"]
    for o in objs:
        for v in o.values():
            if isinstance(v, dict):
                v.pop("handle", None)
    return [o for o in objs if "metainfo" not in o]


def test_detach_leaves_nothing(lab: Lab) -> None:
    ws = lab.mgr.mgr.get("a")
    lab.mgr.add_forward("a", Forward(host_port=18081, guest_port=80))
    lab.mgr.detach("a")
    links = lab.host.ip("-o", "link")
    ruleset = lab.host.run("nft", "list", "ruleset").stdout
    assert ws.tap not in links
    for needle in (ws.tap, ws.address, ws.mac, "ws-a", "eg-a", "18081"):
        assert needle not in ruleset
    assert "a" not in lab.mgr.mgr.state.workspaces
    state = json.loads(lab.mgr.mgr.state_path.read_text())
    assert "a" not in state["workspaces"]
    assert tcp_blocked(lab.host, "127.0.0.1", 18081)
    # b is untouched.
    assert lab.mgr.mgr.get("b").address == "10.42.0.3"
