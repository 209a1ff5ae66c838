"""The generated ruleset against the real kernel, in a namespace the test creates:
accepted on a first apply (no table yet), replaces itself, is all-or-nothing."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest

from agentiso.privhelper.net.config import default_settings
from agentiso.privhelper.net.errors import NetSystemError
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
from agentiso.privhelper.net.ruleset import blocked_networks, build_ruleset, delete_ruleset
from tests.harness.netns import NetNs, NetnsUnavailable, netns

S = default_settings()


def many(n: int) -> NetState:
    """n workspaces exercising every feature of the generator."""
    wss = {}
    for i in range(n):
        addr = ipaddress.IPv4Address(int(S.gateway) + 1 + i)
        policy = NetPolicy(
            egress=i % 2 == 0,
            allow=(
                (
                    AllowRule(
                        cidr="203.0.113.0/24", ports=(PortRange(80, 80), PortRange(9000, 9100))
                    ),
                    AllowRule(cidr="198.51.100.7", protocol="udp"),
                )
                if i % 4 == 0
                else ()
            ),
            peers=(f"w{i + 1}",) if i % 3 == 0 else (),
            groups=("g",) if i % 5 == 0 else (),
            inbound_ports=(22, 8080) if i % 7 == 0 else (),
        )
        wss[f"w{i}"] = WorkspaceNet(
            name=f"w{i}", owner_uid=1000 + i % 3, address=str(addr), mac=mac_for(addr),
            tap=tap_name(S.tap_prefix, addr), policy=policy,
            forwards=(Forward(host_port=20000 + i, guest_port=80),
                      Forward(host_port=30000 + i, guest_port=53, protocol="udp")),
        )  # fmt: skip
    return NetState(workspaces=wss)


@pytest.fixture
def ns() -> Iterator[NetNs]:
    try:
        ctx = netns("ain")
    except NetnsUnavailable as exc:
        pytest.skip(reason=str(exc))
    with ctx as n:
        yield n


def tables(ns: NetNs) -> str:
    return ns.run("nft", "list", "ruleset").stdout


def test_first_apply_replace_and_delete(ns: NetNs) -> None:
    nft = Nft()
    with ns.entered():
        nft.apply(build_ruleset(S, many(40)))  # no table exists yet
        first = tables(ns)
        nft.apply(build_ruleset(S, many(3)))  # replaces everything at once
        second = tables(ns)
    assert "chain ws-w39" in first and "dnat ip to 10.42.0.41:80" in first
    assert "chain ws-w3 " not in second and "chain ws-w2 " in second
    assert "w39" not in second and "20039" not in second
    with ns.entered():
        nft.apply(delete_ruleset())
        nft.apply(delete_ruleset())  # idempotent
    assert tables(ns).strip() == ""


def test_a_refused_batch_changes_nothing(ns: NetNs) -> None:
    nft = Nft()
    with ns.entered():
        nft.apply(build_ruleset(S, many(5)))
    before = tables(ns)
    doc = build_ruleset(S, many(2))
    doc["nftables"].append({"add": {"rule": {
        "family": "inet", "table": "agentiso", "chain": "forward",
        "expr": [{"jump": {"target": "no-such-chain"}}]}}})  # fmt: skip
    with ns.entered(), pytest.raises(NetSystemError):
        nft.apply(doc)
    assert tables(ns) == before


def test_listing_matches_the_generated_sets(ns: NetNs) -> None:
    nft = Nft()
    st = many(12)
    with ns.entered():
        nft.apply(build_ruleset(S, st))
        objs = nft.list_table("inet")
    sets = {o["set"]["name"]: o["set"].get("elem", []) for o in objs if "set" in o}
    assert sorted(sets["egress_on"]) == sorted(
        w.address for w in st.workspaces.values() if w.policy.egress
    )
    assert json.dumps(sets["blocked"]) == json.dumps(
        [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
         for n in blocked_networks(S, ())]
    )
