"""The nftables ruleset, generated whole from typed state (pure).

:func:`build_ruleset` returns one nft JSON document (for ``nft -j -f -``) that
replaces both of our tables in a single kernel transaction: for each table it
emits ``add table`` (a no-op when it exists, so the next command cannot fail on
a first apply), ``delete table`` (drops every old chain, set and rule), then
``add table`` and the full new contents.  Either the whole batch commits or
nothing changes.

Two tables, because an ``inet`` table only sees bridged frames when
br_netfilter is loaded and enabled, which we must not rely on:

``table bridge agentiso`` -- layer 2, per bridge port (TAP):
  * prerouting: frames from each TAP jump to its ``ws-<name>`` chain, which drops
    anything not from the workspace's own MAC and IPv4 address (Ethernet, ARP and
    IP headers), IPv4 to 127.0.0.0/8 and every ethertype but IPv4 and ARP.
    Frames from a TAP with our prefix that no workspace owns are dropped.
  * forward: TAP-to-TAP frames pass only for allowed pairs (``@ws_pairs``).

``table inet agentiso`` -- layer 3, keyed on the source address (which the
bridge table has made trustworthy):
  * forward: established/related pass; from the bridge: allowed workspace
    pairs (for when br_netfilter hands bridged frames to inet too, and for
    frames routed back onto the bridge), blocked destinations dropped, then each
    egress-enabled workspace's ``eg-<name>`` chain (everything, or its allow-list
    plus DNS), anything else dropped; towards the bridge: only DNATed forwards.
  * input: from the bridge only established/related, ping of the gateway and
    (if configured) DNS on the gateway; the host's other services are closed.
  * output: from the host to guests only established, forwards, ping and the
    workspace's ``inbound_ports`` (TCP).
  * nat: DNAT of forwarded host ports in output (connections the host itself
    makes, 127.0.0.1 included, from the owner's uid or root only: ``meta
    skuid``) and, for ``external`` forwards, in prerouting (traffic from other
    hosts, never from guests); masquerade of egress and of 127.0.0.0/8-sourced
    forward traffic (with route_localnet on the bridge).

Blocked destinations (``@blocked``) are the configured ranges (by default
private, CGNAT, loopback, link-local, multicast, reserved) plus the networks on
the host's own interfaces, minus ``@exempt``; the configured DNS servers stay
reachable on port 53 for egress-enabled workspaces.

Every value is validated (again) here; bad input raises a typed error and no
rule is produced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from .config import NetSettings
from .errors import InvalidNetInput, NetConflict
from .model import (
    AllowRule,
    NetState,
    WorkspaceNet,
    check_name,
    check_workspace,
    parse_address,
    parse_network,
)

TABLE = "agentiso"
JsonObj = dict[str, Any]

# Hook priorities (numeric, as the JSON API wants them).
BRIDGE_FILTER_PRIO = -200
FILTER_PRIO = 0
DSTNAT_PRIO = -100
SRCNAT_PRIO = 100

PING_RATE_PER_S = 10


# --- small JSON builders -------------------------------------------------------------------


def _match(left: Any, right: Any, op: str = "==") -> JsonObj:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> JsonObj:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> JsonObj:
    return {"payload": {"protocol": protocol, "field": field}}


def _net(net: ipaddress.IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set(items: Sequence[Any]) -> Any:
    """An anonymous set, or the single value itself."""
    return items[0] if len(items) == 1 else {"set": list(items)}


def _ports(ranges: Iterable[tuple[int, int]]) -> list[Any]:
    return [a if a == b else {"range": [a, b]} for a, b in ranges]


_ACCEPT: JsonObj = {"accept": None}
_DROP: JsonObj = {"drop": None}
_ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")


class _Batch:
    """Accumulates the commands of one table."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.head: list[JsonObj] = []
        self.chains: list[JsonObj] = []
        self.rules: list[JsonObj] = []

    def table(self) -> list[JsonObj]:
        t = {"family": self.family, "name": TABLE}
        return [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]

    def set(self, name: str, type_: Any, elems: list[Any], flags: list[str] | None = None) -> None:
        obj: JsonObj = {"family": self.family, "table": TABLE, "name": name, "type": type_}
        if flags:
            obj["flags"] = flags
        if elems:
            obj["elem"] = elems
        self.head.append({"add": {"set": obj}})

    def chain(self, name: str, hook: tuple[str, str, int] | None = None) -> None:
        obj: JsonObj = {"family": self.family, "table": TABLE, "name": name}
        if hook is not None:
            type_, hook_name, prio = hook
            obj.update(type=type_, hook=hook_name, prio=prio, policy="accept")
        self.chains.append({"add": {"chain": obj}})

    def rule(self, chain: str, *expr: JsonObj) -> None:
        self.rules.append(
            {
                "add": {
                    "rule": {
                        "family": self.family,
                        "table": TABLE,
                        "chain": chain,
                        "expr": list(expr),
                    }
                }
            }
        )

    def commands(self) -> list[JsonObj]:
        return self.table() + self.head + self.chains + self.rules


# --- policy logic ------------------------------------------------------------------------


def connected_pairs(state: NetState) -> list[tuple[WorkspaceNet, WorkspaceNet]]:
    """Unordered pairs of workspaces allowed to talk to each other, sorted by name.

    Across owners both sides must name each other in ``peers``; within one
    owner, one side naming the other or a shared group is enough.
    """
    wss = sorted(state.workspaces.values(), key=lambda w: w.name)
    pairs = []
    for i, a in enumerate(wss):
        for b in wss[i + 1 :]:
            a_names_b = b.name in a.policy.peers
            b_names_a = a.name in b.policy.peers
            if a.owner_uid == b.owner_uid:
                ok = a_names_b or b_names_a or bool(set(a.policy.groups) & set(b.policy.groups))
            else:
                ok = a_names_b and b_names_a
            if ok:
                pairs.append((a, b))
    return pairs


def _allow_rule_exprs(rule: AllowRule) -> list[JsonObj]:
    exprs = [_match(_payload("ip", "daddr"), _net(parse_network(rule.cidr)))]
    protos = ["tcp", "udp"] if rule.protocol == "any" else [rule.protocol]
    if rule.ports:
        exprs.append(_match(_meta("l4proto"), _set(protos)))
        ports = _ports((p.first, p.last) for p in rule.ports)
        exprs.append(_match(_payload("th", "dport"), _set(ports)))
    elif rule.protocol != "any":
        exprs.append(_match(_meta("l4proto"), rule.protocol))
    return exprs


def validate_state(settings: NetSettings, state: NetState) -> None:
    """Everything :func:`build_ruleset` relies on; raises a typed error otherwise."""
    seen_addr: set[str] = set()
    seen_tap: set[str] = set()
    seen_port: set[tuple[str, int]] = set()
    for key, ws in state.workspaces.items():
        check_name(key)
        check_workspace(ws, settings.forward_port_min)
        if key != ws.name:
            raise InvalidNetInput(f"workspace key {key!r} does not match its name")
        addr = parse_address(ws.address)
        if addr not in settings.subnet or addr in (
            settings.gateway,
            settings.subnet.network_address,
            settings.subnet.broadcast_address,
        ):
            raise InvalidNetInput(f"{ws.name}: address {addr} is not a host of the pool")
        if not ws.tap.startswith(settings.tap_prefix):
            raise InvalidNetInput(f"{ws.name}: TAP {ws.tap!r} lacks the prefix")
        if ws.address in seen_addr or ws.tap in seen_tap:
            raise NetConflict(f"{ws.name}: address or TAP shared with another workspace")
        seen_addr.add(ws.address)
        seen_tap.add(ws.tap)
        for fwd in ws.forwards:
            if (fwd.protocol, fwd.host_port) in seen_port:
                raise NetConflict(f"host port {fwd.protocol}/{fwd.host_port} forwarded twice")
            seen_port.add((fwd.protocol, fwd.host_port))


# --- the generator -------------------------------------------------------------------------


def build_ruleset(
    settings: NetSettings, state: NetState, host_networks: Iterable[str] = ()
) -> JsonObj:
    """The complete nft JSON transaction for ``state`` (see the module docstring).

    ``host_networks`` are the CIDRs on the host's own interfaces; they join the
    blocked destinations when ``settings.block_host_networks`` is set.
    """
    validate_state(settings, state)
    wss = sorted(state.workspaces.values(), key=lambda w: w.name)
    pairs = connected_pairs(state)
    blocked = blocked_networks(settings, host_networks)
    return {
        "nftables": _bridge_table(settings, wss, pairs)
        + _inet_table(settings, wss, pairs, blocked)
    }


def blocked_networks(
    settings: NetSettings, host_networks: Iterable[str]
) -> list[ipaddress.IPv4Network]:
    """The configured blocked ranges plus (if so configured) the host's
    networks, merged: an nft interval set refuses overlapping elements."""
    nets = list(settings.blocked)
    if settings.block_host_networks:
        for text in host_networks:
            net = ipaddress.ip_network(text, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                nets.append(net)
    return list(ipaddress.collapse_addresses(nets))


def _bridge_table(
    s: NetSettings,
    wss: list[WorkspaceNet],
    pairs: list[tuple[WorkspaceNet, WorkspaceNet]],
) -> list[JsonObj]:
    b = _Batch("bridge")
    wildcard = s.tap_prefix + "*"
    pair_elems = []
    for x, y in pairs:
        pair_elems += [{"concat": [x.tap, y.tap]}, {"concat": [y.tap, x.tap]}]
    b.set("ws_pairs", ["ifname", "ifname"], pair_elems)

    for ws in wss:
        chain = f"ws-{ws.name}"
        b.chain(chain)
        ether_type = _payload("ether", "type")
        b.rule(chain, _match(_payload("ether", "saddr"), ws.mac, "!="), _DROP)
        b.rule(
            chain,
            _match(ether_type, "arp"),
            _match(_payload("arp", "saddr ether"), ws.mac, "!="),
            _DROP,
        )
        b.rule(
            chain,
            _match(ether_type, "arp"),
            _match(_payload("arp", "saddr ip"), ws.address, "!="),
            _DROP,
        )
        b.rule(
            chain,
            _match(ether_type, "ip"),
            _match(_payload("ip", "saddr"), ws.address, "!="),
            _DROP,
        )
        b.rule(
            chain,
            _match(ether_type, "ip"),
            _match(_payload("ip", "daddr"), _net(ipaddress.IPv4Network("127.0.0.0/8"))),
            _DROP,
        )
        b.rule(chain, _match(ether_type, {"set": ["ip", "arp"]}, "!="), _DROP)
        b.rule(chain, _ACCEPT)

    b.chain("prerouting", ("filter", "prerouting", BRIDGE_FILTER_PRIO))
    if wss:
        vmap = [[ws.tap, {"jump": {"target": f"ws-{ws.name}"}}] for ws in wss]
        b.rule("prerouting", {"vmap": {"key": _meta("iifname"), "data": {"set": vmap}}})
    # A TAP of ours that no workspace owns (leftover, or not yet in the state): mute.
    b.rule("prerouting", _match(_meta("iifname"), wildcard), _DROP)

    b.chain("forward", ("filter", "forward", BRIDGE_FILTER_PRIO))
    b.rule(
        "forward", _match({"concat": [_meta("iifname"), _meta("oifname")]}, "@ws_pairs"), _ACCEPT
    )
    b.rule("forward", _match(_meta("iifname"), wildcard), _match(_meta("oifname"), wildcard), _DROP)
    return b.commands()


def _inet_table(
    s: NetSettings,
    wss: list[WorkspaceNet],
    pairs: list[tuple[WorkspaceNet, WorkspaceNet]],
    blocked: list[ipaddress.IPv4Network],
) -> list[JsonObj]:
    b = _Batch("inet")
    br = s.bridge
    from_br = _match(_meta("iifname"), br)
    to_br = _match(_meta("oifname"), br)
    egress_wss = [ws for ws in wss if ws.policy.egress]

    b.set("egress_on", "ipv4_addr", [ws.address for ws in egress_wss])
    ip_pairs = []
    for x, y in pairs:
        ip_pairs += [{"concat": [x.address, y.address]}, {"concat": [y.address, x.address]}]
    b.set("ws_pairs", ["ipv4_addr", "ipv4_addr"], ip_pairs)
    b.set("blocked", "ipv4_addr", [_net(n) for n in blocked], flags=["interval"])
    exempt = list(ipaddress.collapse_addresses(s.exempt))
    b.set("exempt", "ipv4_addr", [_net(n) for n in exempt], flags=["interval"])
    inbound = sorted(
        {(ws.address, p) for ws in wss for p in ws.policy.inbound_ports},
        key=lambda e: (ipaddress.IPv4Address(e[0]), e[1]),
    )
    b.set("inbound", ["ipv4_addr", "inet_service"], [{"concat": [a, p]} for a, p in inbound])
    # Per-workspace egress chains.
    dns = [str(a) for a in s.dns]
    for ws in egress_wss:
        chain = f"eg-{ws.name}"
        b.chain(chain)
        if not ws.policy.allow:
            b.rule(chain, _ACCEPT)
            continue
        for rule in ws.policy.allow:
            b.rule(chain, *_allow_rule_exprs(rule), _ACCEPT)
        if dns:
            b.rule(
                chain,
                _match(_payload("ip", "daddr"), _set(dns)),
                _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
                _match(_payload("th", "dport"), 53),
                _ACCEPT,
            )

    b.chain("forward", ("filter", "forward", FILTER_PRIO))
    b.rule("forward", _ESTABLISHED, _ACCEPT)
    b.rule("forward", from_br, _match({"ct": {"key": "state"}}, "invalid", "in"), _DROP)
    b.rule(
        "forward",
        from_br,
        to_br,
        _match({"concat": [_payload("ip", "saddr"), _payload("ip", "daddr")]}, "@ws_pairs"),
        _ACCEPT,
    )
    b.rule("forward", from_br, to_br, _DROP)
    if dns:
        # The configured resolvers stay reachable for egress-enabled workspaces
        # even when they sit in a blocked range (a resolver on the LAN).
        b.rule(
            "forward",
            from_br,
            _match(_payload("ip", "saddr"), "@egress_on"),
            _match(_payload("ip", "daddr"), _set(dns)),
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            _match(_payload("th", "dport"), 53),
            _ACCEPT,
        )
    not_exempt = [_match(_payload("ip", "daddr"), "@exempt", "!=")] if exempt else []
    b.rule("forward", from_br, _match(_payload("ip", "daddr"), "@blocked"), *not_exempt, _DROP)
    if egress_wss:
        vmap = [[ws.address, {"jump": {"target": f"eg-{ws.name}"}}] for ws in egress_wss]
        b.rule(
            "forward", from_br, {"vmap": {"key": _payload("ip", "saddr"), "data": {"set": vmap}}}
        )
    b.rule("forward", from_br, _DROP)
    b.rule("forward", to_br, _match({"ct": {"key": "status"}}, "dnat", "in"), _ACCEPT)
    b.rule("forward", to_br, _DROP)

    gw = str(s.gateway)
    b.chain("input", ("filter", "input", FILTER_PRIO))
    b.rule("input", from_br, _ESTABLISHED, _ACCEPT)
    b.rule(
        "input",
        from_br,
        _match(_payload("ip", "daddr"), gw),
        _match(_payload("icmp", "type"), "echo-request"),
        {"limit": {"rate": PING_RATE_PER_S, "per": "second"}},
        _ACCEPT,
    )
    if s.gateway_dns:
        b.rule(
            "input",
            from_br,
            _match(_payload("ip", "daddr"), gw),
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            _match(_payload("th", "dport"), 53),
            _ACCEPT,
        )
    b.rule("input", from_br, _DROP)

    b.chain("output", ("filter", "output", FILTER_PRIO))
    b.rule("output", to_br, _ESTABLISHED, _ACCEPT)
    b.rule("output", to_br, _match({"ct": {"key": "status"}}, "dnat", "in"), _ACCEPT)
    b.rule(
        "output",
        to_br,
        _match(_meta("l4proto"), "tcp"),
        _match({"concat": [_payload("ip", "daddr"), _payload("tcp", "dport")]}, "@inbound"),
        _ACCEPT,
    )
    b.rule("output", to_br, _match(_payload("icmp", "type"), "echo-request"), _ACCEPT)
    b.rule("output", to_br, _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _DROP)

    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    b.chain("prerouting", ("nat", "prerouting", DSTNAT_PRIO))
    b.chain("nat-output", ("nat", "output", DSTNAT_PRIO))
    # One rule per forward (nft 1.0.6 crashes on JSON "dnat to <concat map>").
    not_from_br = _match(_meta("iifname"), br, "!=")
    for ws in wss:
        # Connections the host itself makes are forwarded for the owner (and
        # root) only: another local user reaches nothing through the port.
        owners = _set(sorted({ws.owner_uid, 0}))
        for f in sorted(ws.forwards, key=lambda f: (f.protocol, f.host_port)):
            l4 = _match(_meta("l4proto"), f.protocol)
            dport = _match(_payload(f.protocol, "dport"), f.host_port)
            dnat = {"dnat": {"family": "ip", "addr": ws.address, "port": f.guest_port}}
            if f.external:
                # Guests never go through forwards: that would bypass workspace isolation.
                b.rule("prerouting", not_from_br, local, l4, dport, dnat)
            b.rule("nat-output", local, l4, dport, _match(_meta("skuid"), owners), dnat)

    b.chain("postrouting", ("nat", "postrouting", SRCNAT_PRIO))
    b.rule(
        "postrouting",
        to_br,
        _match(_payload("ip", "saddr"), _net(ipaddress.IPv4Network("127.0.0.0/8"))),
        {"masquerade": None},
    )
    b.rule(
        "postrouting",
        _match(_meta("oifname"), br, "!="),
        _match(_payload("ip", "saddr"), "@egress_on"),
        {"masquerade": None},
    )
    return b.commands()


def delete_ruleset() -> JsonObj:
    """A transaction removing both tables; succeeds whether or not they exist."""
    cmds: list[JsonObj] = []
    for family in ("bridge", "inet"):
        t = {"family": family, "name": TABLE}
        cmds += [{"add": {"table": t}}, {"delete": {"table": t}}]
    return {"nftables": cmds}
