"""The ruleset generator: one test per policy, plus hostile state -> typed errors.

Rules are checked structurally in the nft JSON the generator emits; the kernel
accepting them is tested in tests/integration/test_net_ruleset_apply.py.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import msgspec
import pytest

from agentiso.privhelper.net.config import NetConfig, default_settings, parse_net_config
from agentiso.privhelper.net.errors import InvalidNetInput, NetConflict, NetError
from agentiso.privhelper.net.model import (
    AllowRule,
    Forward,
    NetPolicy,
    NetState,
    PortRange,
    WorkspaceNet,
)
from agentiso.privhelper.net.naming import mac_for, tap_name
from agentiso.privhelper.net.ruleset import build_ruleset, connected_pairs, delete_ruleset

S = default_settings()


def ws(
    name: str, host: int, owner: int = 1000, forwards: tuple[Forward, ...] = (), **policy: Any
) -> WorkspaceNet:
    addr = ipaddress.IPv4Address(f"10.42.0.{host}")
    return WorkspaceNet(
        name=name,
        owner_uid=owner,
        address=str(addr),
        mac=mac_for(addr),
        tap=tap_name("ai-", addr),
        policy=NetPolicy(**policy),
        forwards=forwards,
    )


def state(*wss: WorkspaceNet) -> NetState:
    return NetState(workspaces={w.name: w for w in wss})


def cmds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["nftables"])


def added(doc: dict[str, Any], kind: str, family: str | None = None) -> list[dict[str, Any]]:
    return [
        c["add"][kind]
        for c in cmds(doc)
        if "add" in c
        and kind in c["add"]
        and (family is None or c["add"][kind]["family"] == family)
    ]


def rules(doc: dict[str, Any], family: str, chain: str) -> list[list[dict[str, Any]]]:
    return [r["expr"] for r in added(doc, "rule", family) if r["chain"] == chain]


def set_elems(doc: dict[str, Any], family: str, name: str) -> list[Any]:
    for s in added(doc, "set", family):
        if s["name"] == name:
            return list(s.get("elem", []))
    raise AssertionError(f"no set {name}")


def text(expr: list[dict[str, Any]]) -> str:
    return json.dumps(expr, sort_keys=True)


# --- transaction shape -----------------------------------------------------------------


def test_each_table_is_replaced_atomically_even_when_absent() -> None:
    doc = build_ruleset(S, NetState())
    c = cmds(doc)
    for family in ("bridge", "inet"):
        t = {"family": family, "name": "agentiso"}
        i = c.index({"add": {"table": t}})
        # add (so the delete cannot fail on a first apply), delete, add again
        assert c[i : i + 3] == [
            {"add": {"table": t}},
            {"delete": {"table": t}},
            {"add": {"table": t}},
        ]
    assert not any("flush" in x for x in c)
    assert all(set(x) <= {"add", "delete"} for x in c)


def test_output_is_deterministic_and_json() -> None:
    a, b = ws("a", 2, egress=True), ws("b", 3, peers=("a",))
    one = build_ruleset(S, state(a, b))
    two = build_ruleset(S, NetState(workspaces={"b": b, "a": a}))
    assert json.dumps(one) == json.dumps(two)


def test_delete_ruleset_tolerates_missing_tables() -> None:
    c = cmds(delete_ruleset())
    assert c[0] == {"add": {"table": {"family": "bridge", "name": "agentiso"}}}
    assert {"delete": {"table": {"family": "inet", "name": "agentiso"}}} in c


# --- anti-spoofing ---------------------------------------------------------------------


def test_anti_spoofing_chain_per_workspace() -> None:
    a = ws("a", 2)
    doc = build_ruleset(S, state(a))
    chain = [text(r) for r in rules(doc, "bridge", "ws-a")]
    assert any('"saddr"' in r and a.mac in r and '"!="' in r and '"ether"' in r for r in chain)
    assert any('"saddr ether"' in r and a.mac in r for r in chain)
    assert any('"saddr ip"' in r and a.address in r for r in chain)
    assert any('"ip"' in r and '"saddr"' in r and a.address in r and '"drop"' in r for r in chain)
    assert any("127.0.0.0" in r for r in chain)
    assert any('["ip", "arp"]' in r and '"!="' in r for r in chain)  # other ethertypes
    assert chain[-1] == text([{"accept": None}])
    pre = [text(r) for r in rules(doc, "bridge", "prerouting")]
    assert a.tap in pre[0] and "ws-a" in pre[0]
    assert '"ai-*"' in pre[-1] and '"drop"' in pre[-1]  # unknown TAPs of ours are muted


def test_no_vmap_without_workspaces() -> None:
    doc = build_ruleset(S, NetState())
    assert rules(doc, "bridge", "prerouting") == [
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "ai-*"}},
            {"drop": None},
        ]
    ]
    assert not any("vmap" in text(r) for r in rules(doc, "inet", "forward"))


# --- inter-workspace -------------------------------------------------------------------


def test_workspaces_isolated_by_default() -> None:
    doc = build_ruleset(S, state(ws("a", 2), ws("b", 3)))
    assert set_elems(doc, "bridge", "ws_pairs") == []
    assert set_elems(doc, "inet", "ws_pairs") == []
    fwd = [text(r) for r in rules(doc, "bridge", "forward")]
    assert "@ws_pairs" in fwd[0]
    assert fwd[1].count('"ai-*"') == 2 and '"drop"' in fwd[1]


@pytest.mark.parametrize(
    ("pa", "pb", "same_owner", "expected"),
    [
        ({}, {}, True, False),
        ({"peers": ("b",)}, {}, True, True),  # same owner: one side suffices
        ({"peers": ("b",)}, {}, False, False),  # other owner: both must consent
        ({"peers": ("b",)}, {"peers": ("a",)}, False, True),
        ({"groups": ("g",)}, {"groups": ("g",)}, True, True),
        ({"groups": ("g",)}, {"groups": ("g",)}, False, False),  # groups are per owner
        ({"groups": ("g",)}, {"groups": ("h",)}, True, False),
    ],
)
def test_pair_policy(
    pa: dict[str, Any], pb: dict[str, Any], same_owner: bool, expected: bool
) -> None:
    a = ws("a", 2, **pa)
    b = ws("b", 3, owner=1000 if same_owner else 1001, **pb)
    st = state(a, b)
    assert bool(connected_pairs(st)) is expected
    doc = build_ruleset(S, st)
    br = set_elems(doc, "bridge", "ws_pairs")
    ip = set_elems(doc, "inet", "ws_pairs")
    if expected:
        assert {"concat": [a.tap, b.tap]} in br and {"concat": [b.tap, a.tap]} in br
        assert {"concat": [a.address, b.address]} in ip
        assert {"concat": [b.address, a.address]} in ip
    else:
        assert br == [] and ip == []


def test_pair_only_between_the_named() -> None:
    st = state(ws("a", 2, peers=("b",)), ws("b", 3), ws("c", 4))
    assert [(x.name, y.name) for x, y in connected_pairs(st)] == [("a", "b")]


# --- egress ----------------------------------------------------------------------------


def test_egress_off_has_no_path_out_and_no_masquerade() -> None:
    doc = build_ruleset(S, state(ws("a", 2)))
    assert set_elems(doc, "inet", "egress_on") == []
    assert not [c for c in added(doc, "chain", "inet") if c["name"].startswith("eg-")]
    fwd = [text(r) for r in rules(doc, "inet", "forward")]
    assert fwd[-3] == text(
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br-agentiso"}},
            {"drop": None},
        ]
    )


def test_egress_on_without_allow_list_accepts_all_but_blocked() -> None:
    doc = build_ruleset(S, state(ws("a", 2, egress=True)))
    assert set_elems(doc, "inet", "egress_on") == ["10.42.0.2"]
    assert rules(doc, "inet", "eg-a") == [[{"accept": None}]]
    fwd = [text(r) for r in rules(doc, "inet", "forward")]
    blocked = next(i for i, r in enumerate(fwd) if "@blocked" in r)
    jump = next(i for i, r in enumerate(fwd) if "eg-a" in r)
    assert blocked < jump  # blocked ranges win over any policy
    assert {"prefix": {"addr": "169.254.0.0", "len": 16}} in set_elems(doc, "inet", "blocked")
    post = [text(r) for r in rules(doc, "inet", "postrouting")]
    assert any("@egress_on" in r and "masquerade" in r and '"!="' in r for r in post)


def test_allow_list() -> None:
    allow = (
        AllowRule(cidr="203.0.113.0/24", ports=(PortRange(80, 80), PortRange(8000, 8100))),
        AllowRule(cidr="198.51.100.7", protocol="udp"),
        AllowRule(cidr="192.0.2.0/25", ports=(PortRange(443, 443),), protocol="tcp"),
    )
    doc = build_ruleset(S, state(ws("a", 2, egress=True, allow=allow)))
    eg = rules(doc, "inet", "eg-a")
    assert len(eg) == 4
    r0 = text(eg[0])
    assert '"addr": "203.0.113.0", "len": 24' in r0
    assert '["tcp", "udp"]' in r0 and '{"range": [8000, 8100]}' in r0 and "80" in r0
    r1 = text(eg[1])
    assert '"198.51.100.7"' in r1 and '"udp"' in r1 and "dport" not in r1
    r2 = text(eg[2])
    assert '"right": "tcp"' in r2 and '"right": 443' in r2
    dns = text(eg[3])
    assert "1.1.1.1" in dns and "8.8.8.8" in dns and '"right": 53' in dns
    assert all(r[-1] == {"accept": None} for r in eg)


def test_only_egress_workspaces_are_masqueraded() -> None:
    doc = build_ruleset(S, state(ws("a", 2, egress=True), ws("b", 3)))
    assert set_elems(doc, "inet", "egress_on") == ["10.42.0.2"]
    vmap = next(r for r in rules(doc, "inet", "forward") if "vmap" in text(r))
    assert "10.42.0.3" not in text(vmap)


# --- host services, inbound, forwards ---------------------------------------------------


def test_host_services_closed_except_ping_and_optional_dns() -> None:
    doc = build_ruleset(S, NetState())
    inp = [text(r) for r in rules(doc, "inet", "input")]
    assert len(inp) == 3 and "echo-request" in inp[1] and '"drop"' in inp[-1]
    s2 = parse_net_config(NetConfig(gateway_dns=True))
    inp2 = [text(r) for r in rules(build_ruleset(s2, NetState()), "inet", "input")]
    assert len(inp2) == 4 and '"right": 53' in inp2[2] and '"10.42.0.1"' in inp2[2]


def test_inbound_ports_from_the_host() -> None:
    doc = build_ruleset(S, state(ws("a", 2, inbound_ports=(22, 8080)), ws("b", 3)))
    assert set_elems(doc, "inet", "inbound") == [
        {"concat": ["10.42.0.2", 22]},
        {"concat": ["10.42.0.2", 8080]},
    ]
    out = [text(r) for r in rules(doc, "inet", "output")]
    assert any("@inbound" in r for r in out)
    assert '"drop"' in out[-1]


def test_forwards_become_dnat_in_prerouting_and_output() -> None:
    fwds = (
        Forward(host_port=8080, guest_port=80),
        Forward(host_port=5353, guest_port=53, protocol="udp"),
    )
    doc = build_ruleset(S, state(ws("a", 2, forwards=fwds)))
    pre = [text(r) for r in rules(doc, "inet", "prerouting")]
    out = [text(r) for r in rules(doc, "inet", "nat-output")]
    assert pre == []  # not external: other hosts get nothing
    assert len(out) == 2
    ext = tuple(msgspec.structs.replace(f, external=True) for f in fwds)
    doc = build_ruleset(S, state(ws("a", 2, forwards=ext)))
    pre = [text(r) for r in rules(doc, "inet", "prerouting")]
    out = [text(r) for r in rules(doc, "inet", "nat-output")]
    assert len(pre) == len(out) == 2
    not_from_bridge = {
        "match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "br-agentiso"}
    }
    for expr in rules(doc, "inet", "prerouting"):
        # never from the bridge: guests must not hairpin into other workspaces
        assert expr[0] == not_from_bridge
    tcp = next(r for r in out if '"tcp"' in r)
    assert '"dnat": {"addr": "10.42.0.2", "family": "ip", "port": 80}' in tcp
    assert '"right": 8080' in tcp and '"local"' in tcp
    # Locally made connections are forwarded for the owner (uid 1000 here) and root only.
    assert '{"meta": {"key": "skuid"}}, "op": "==", "right": {"set": [0, 1000]}' in tcp
    assert all("skuid" not in r for r in pre)  # other hosts' packets have no socket
    post = [text(r) for r in rules(doc, "inet", "postrouting")]
    assert any("127.0.0.0" in r and "masquerade" in r for r in post)
    fwd = [text(r) for r in rules(doc, "inet", "forward")]
    assert any('"dnat"' in r and "status" in r for r in fwd)


# --- hostile state ----------------------------------------------------------------------


def _replace(w: WorkspaceNet, **changes: Any) -> WorkspaceNet:
    return msgspec.structs.replace(w, **changes)


BAD_STATES = [
    ("tap wildcard", lambda a: _replace(a, tap="ai-*")),
    ("tap quote", lambda a: _replace(a, tap='ai-"x')),
    ("tap too long", lambda a: _replace(a, tap="ai-0123456789abc")),
    ("tap without prefix", lambda a: _replace(a, tap="eth0")),
    ("name", lambda a: _replace(a, name='a"; flush ruleset')),
    ("address outside", lambda a: _replace(a, address="192.168.1.2")),
    ("gateway address", lambda a: _replace(a, address="10.42.0.1")),
    ("broadcast", lambda a: _replace(a, address="10.42.255.255")),
    ("address syntax", lambda a: _replace(a, address="10.42.0.2 drop")),
    ("mac", lambda a: _replace(a, mac="02:a6:0a:2a:00:02; drop")),
    (
        "cidr",
        lambda a: _replace(
            a, policy=NetPolicy(egress=True, allow=(AllowRule(cidr="10.0.0.0/99"),))
        ),
    ),
    ("port", lambda a: _replace(a, policy=NetPolicy(inbound_ports=(65536,)))),
    (
        "range",
        lambda a: _replace(
            a,
            policy=NetPolicy(
                egress=True, allow=(AllowRule(cidr="0.0.0.0/0", ports=(PortRange(0, 70000),)),)
            ),
        ),
    ),
    ("privileged forward", lambda a: _replace(a, forwards=(Forward(host_port=22, guest_port=22),))),
    ("peer", lambda a: _replace(a, policy=NetPolicy(peers=("../b",)))),
]


@pytest.mark.parametrize(("label", "mutate"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_hostile_state_is_refused(label: str, mutate: Any) -> None:
    a = mutate(ws("a", 2))
    with pytest.raises(InvalidNetInput):
        build_ruleset(S, NetState(workspaces={"a": a}))


def test_state_key_must_match_name() -> None:
    with pytest.raises(InvalidNetInput):
        build_ruleset(S, NetState(workspaces={"x": ws("a", 2)}))


def test_duplicates_are_conflicts() -> None:
    a, b = ws("a", 2), ws("b", 2)
    with pytest.raises(NetConflict):
        build_ruleset(S, state(a, _replace(b, tap="ai-0a2a0003")))
    f = (Forward(host_port=9000, guest_port=80),)
    with pytest.raises(NetConflict):
        build_ruleset(S, state(ws("a", 2, forwards=f), ws("b", 3, forwards=f)))
    with pytest.raises(NetError):
        build_ruleset(S, state(ws("a", 2, forwards=f + f)))


# --- the default block list --------------------------------------------------------------


def _blocked(doc: dict[str, Any]) -> list[ipaddress.IPv4Network]:
    out = []
    for e in set_elems(doc, "inet", "blocked"):
        if isinstance(e, str):
            out.append(ipaddress.IPv4Network(e))
        else:
            out.append(ipaddress.IPv4Network(f"{e['prefix']['addr']}/{e['prefix']['len']}"))
    return out


@pytest.mark.parametrize(
    "dest",
    ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1", "100.127.255.1",
     "169.254.169.254", "127.0.0.1", "0.0.0.1", "224.0.0.251", "255.255.255.255"],
)
def test_default_block_list_covers_private_cgnat_link_local_loopback(dest: str) -> None:
    doc = build_ruleset(S, state(ws("a", 2, egress=True)))
    assert any(ipaddress.IPv4Address(dest) in n for n in _blocked(doc)), dest


@pytest.mark.parametrize("dest", ["1.1.1.1", "8.8.8.8", "203.0.113.5", "172.32.0.1", "100.128.0.1"])
def test_default_block_list_leaves_the_internet(dest: str) -> None:
    doc = build_ruleset(S, state(ws("a", 2, egress=True)))
    assert not any(ipaddress.IPv4Address(dest) in n for n in _blocked(doc)), dest


def test_host_networks_are_blocked_merged_and_can_be_allowed() -> None:
    hosts = ["198.51.100.0/24", "10.9.0.0/16", "192.0.2.7/32"]
    doc = build_ruleset(S, state(ws("a", 2, egress=True)), hosts)
    blocked = _blocked(doc)
    for dest in ("198.51.100.9", "192.0.2.7"):
        assert any(ipaddress.IPv4Address(dest) in n for n in blocked), dest
    # Overlaps are merged (10.9/16 inside 10/8): nft refuses overlapping intervals.
    assert not any(a != b and a.overlaps(b) for a in blocked for b in blocked)
    off = parse_net_config(NetConfig(block_host_networks=False))
    blocked = _blocked(build_ruleset(off, state(ws("a", 2, egress=True)), hosts))
    assert not any(ipaddress.IPv4Address("198.51.100.9") in n for n in blocked)


def test_exempt_destinations_pass_the_block_list() -> None:
    s2 = parse_net_config(NetConfig(exempt=("10.1.2.3", "192.168.7.0/24")))
    doc = build_ruleset(s2, state(ws("a", 2, egress=True)))
    assert set_elems(doc, "inet", "exempt") == [
        "10.1.2.3", {"prefix": {"addr": "192.168.7.0", "len": 24}}
    ]
    fwd = [text(r) for r in rules(doc, "inet", "forward")]
    rule = next(r for r in fwd if "@blocked" in r)
    assert '"op": "!=", "right": "@exempt"' in rule
    plain = [text(r) for r in rules(build_ruleset(S, state(ws("a", 2))), "inet", "forward")]
    assert "@exempt" not in next(r for r in plain if "@blocked" in r)


def test_dns_servers_stay_reachable_before_the_block_list() -> None:
    s2 = parse_net_config(NetConfig(dns=("192.168.1.53",)))
    doc = build_ruleset(s2, state(ws("a", 2, egress=True)))
    fwd = [text(r) for r in rules(doc, "inet", "forward")]
    dns = next(i for i, r in enumerate(fwd) if "192.168.1.53" in r)
    blocked = next(i for i, r in enumerate(fwd) if "@blocked" in r)
    assert dns < blocked and "@egress_on" in fwd[dns] and '"right": 53' in fwd[dns]


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-net", "10.0.0.1/8", "::/0"])
def test_bad_exempt_is_refused(bad: str) -> None:
    with pytest.raises(NetError):
        parse_net_config(NetConfig(exempt=(bad,)))
