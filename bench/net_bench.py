"""Network layer benchmark (root; everything inside namespaces it creates).

Prints:
* TAP + rules setup time per workspace (NetworkManager.attach: address, TAP
  via /dev/net/tun on the bridge, whole-ruleset apply), and detach time,
  as the number of workspaces grows to 100;
* full ruleset apply time with 100 workspaces (generation and ``nft -j -f -``);
* TCP throughput across the bridge with namespaces standing in for guests
  (guest -> guest, host -> guest, guest -> simulated internet through masquerade).

Run: ``.venv/bin/python -m bench.net_bench`` (or ``python -m bench net``).
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentiso.privhelper.net.config import default_settings
from agentiso.privhelper.net.manager import NetworkManager
from agentiso.privhelper.net.model import (
    AllowRule,
    Forward,
    NetPolicy,
    NetState,
    PortRange,
    WorkspaceNet,
)
from agentiso.privhelper.net.naming import mac_for, tap_name
from agentiso.privhelper.net.nft import Nft
from agentiso.privhelper.net.ruleset import build_ruleset
from tests.harness import netns as netns_mod
from tests.harness.netns import NetnsUnavailable, netns, uplink, veth_guest

N_WORKSPACES = 100
THROUGHPUT_S = 3.0


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(0.9 * (len(xs) - 1))]
    med = statistics.median(xs)
    return f"p50 {med * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms, max {xs[-1] * 1e3:.1f} ms"


def bench_attach() -> None:
    settings = default_settings()
    with netns("aib") as ns, tempfile.TemporaryDirectory() as tmp:
        mgr = NetworkManager(settings, Path(tmp))
        try:
            with ns.entered():
                mgr.start()
                times, fds = [], []
                for i in range(N_WORKSPACES):
                    t0 = time.perf_counter()
                    att = mgr.attach(f"w{i}", 1000, NetPolicy(egress=i % 2 == 0))
                    times.append(time.perf_counter() - t0)
                    fds.append(att.tap_fd)
                print(f"attach (TAP + rules), workspaces 1..10:   {_ms(times[:10])}")
                print(f"attach (TAP + rules), workspaces 91..100: {_ms(times[-10:])}")
                dt = []
                for i in range(N_WORKSPACES):
                    t0 = time.perf_counter()
                    mgr.detach(f"w{i}")
                    dt.append(time.perf_counter() - t0)
                for fd in fds:
                    os.close(fd)
                print(f"detach, from 100 workspaces down:         {_ms(dt)}")
        finally:
            with ns.entered():
                mgr.teardown()
            mgr.links.close()


def big_state(n: int) -> NetState:
    s = default_settings()
    wss = {}
    for i in range(n):
        addr = ipaddress.IPv4Address(int(s.gateway) + 1 + i)
        pol = NetPolicy(
            egress=i % 2 == 0,
            allow=(AllowRule(cidr="203.0.113.0/24", ports=(PortRange(443, 443),)),)
            if i % 4 == 0 else (),
            peers=(f"w{i + 1}",) if i % 3 == 0 else (),
            inbound_ports=(22,) if i % 5 == 0 else (),
        )  # fmt: skip
        wss[f"w{i}"] = WorkspaceNet(
            name=f"w{i}", owner_uid=1000, address=str(addr), mac=mac_for(addr),
            tap=tap_name(s.tap_prefix, addr), policy=pol,
            forwards=(Forward(host_port=20000 + i, guest_port=80),),
        )  # fmt: skip
    return NetState(workspaces=wss)


def bench_apply() -> None:
    s = default_settings()
    state = big_state(N_WORKSPACES)
    gen = []
    for _ in range(10):
        t0 = time.perf_counter()
        doc = build_ruleset(s, state)
        gen.append(time.perf_counter() - t0)
    n_cmds = len(doc["nftables"])
    with netns("aib") as ns, ns.entered():
        nft = Nft()
        apply = []
        for _ in range(7):
            t0 = time.perf_counter()
            nft.apply(doc)
            apply.append(time.perf_counter() - t0)
    print(f"ruleset generation, {N_WORKSPACES} workspaces ({n_cmds} commands): {_ms(gen)}")
    print(f"ruleset apply (nft -j -f -, one transaction), {N_WORKSPACES} workspaces: {_ms(apply)}")


def bench_throughput() -> None:
    settings = default_settings()
    with (
        netns("aih") as host, netns("aia") as ga, netns("aib") as gb, netns("aii") as net,
        tempfile.TemporaryDirectory() as tmp,
    ):  # fmt: skip
        mgr = NetworkManager(settings, Path(tmp))
        try:
            with host.entered():
                mgr.start()
            uplink(host, net, host_addr="198.51.100.1", net_addr="198.51.100.2", prefix=24)
            for name, guest, peer in (("a", ga, "b"), ("b", gb, "a")):
                pol = NetPolicy(egress=True, peers=(peer,), inbound_ports=(5001,))
                with host.entered():
                    ws = mgr.reserve(name, 1000, pol)
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
                    mgr.links.enslave(ws.tap, settings.bridge)
            for ns in (gb, net):
                proc = ns.spawn(sys.executable, netns_mod.__file__, "sink", "5001")
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            b = mgr.get("b").address
            for label, src, dst in (
                ("guest -> guest (bridged)", ga, b),
                ("host -> guest (routed)", host, b),
                ("guest -> internet (routed, masquerade)", ga, "198.51.100.2"),
            ):
                r = src.probe(
                    "blast",
                    dst,
                    "5001",
                    str(THROUGHPUT_S),
                    timeout=60,
                )
                if r.returncode != 0 or not r.stdout.strip():
                    # One path that does not work here must not hide the others.
                    why = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"TCP throughput {label}: not measured (exit {r.returncode}: {why})")
                    continue
                print(
                    f"TCP throughput {label}: {float(r.stdout):.0f} MiB/s "
                    f"(one stream, {THROUGHPUT_S:.0f} s, Python sender)"
                )
        finally:
            with host.entered():
                mgr.teardown()
            mgr.links.close()


def main() -> int:
    if os.geteuid() != 0:
        print("net_bench: skipped (needs root for network namespaces)")
        return 0
    try:
        bench_attach()
        bench_apply()
        bench_throughput()
    except NetnsUnavailable as exc:
        print(f"net_bench: skipped ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
