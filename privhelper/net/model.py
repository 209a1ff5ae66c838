"""Typed network state and the validation of everything that enters it.

The state is plain msgspec Structs (so it round-trips through the JSON state
file) holding addresses as canonical strings.  Every value that reaches the
ruleset generator has passed one of the ``check_*``/``parse_*`` functions
here, and the generator calls them again: a hostile string never becomes
part of an nft rule.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agentiso.protocol.types import NAME_PATTERN

from .errors import InvalidNetInput

STATE_VERSION = 1

#: Linux interface names: at most IFNAMSIZ-1 = 15 bytes.  We accept a strict
#: subset (no '/', ':', '*', whitespace, quotes or NUL) so a name is also safe
#: in an nft string, where '*' would be a wildcard.
IFNAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
_NAME_RE = re.compile(NAME_PATTERN)
_MAC_RE = re.compile(r"^(?:[0-9a-f]{2}:){5}[0-9a-f]{2}$")

Port = Annotated[int, Meta(ge=1, le=65535)]
Proto = Literal["tcp", "udp"]

MAX_ALLOW_RULES = 64
MAX_PORT_ITEMS = 32
MAX_PEERS = 64
MAX_GROUPS = 16
MAX_INBOUND_PORTS = 64
MAX_FORWARDS = 32


class PortRange(msgspec.Struct, forbid_unknown_fields=True, frozen=True, array_like=True):
    """Ports ``first``..``last`` inclusive."""

    first: Port
    last: Port


class AllowRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Egress to ``cidr``; on ``ports`` only if any are given (tcp and/or udp)."""

    cidr: Annotated[str, Meta(max_length=43)]
    ports: Annotated[tuple[PortRange, ...], Meta(max_length=MAX_PORT_ITEMS)] = ()
    protocol: Literal["tcp", "udp", "any"] = "any"


class NetPolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a workspace may do on the network.

    * ``egress``: traffic leaving the bridge towards other networks, masqueraded.
      With an empty ``allow`` it reaches everything but the configured blocked
      ranges; with ``allow`` set it reaches only those destinations (plus the
      configured DNS servers on port 53).
    * ``peers``/``groups``: inter-workspace traffic, off by default.  A pair of
      workspaces may talk when both name each other in ``peers``; when they have
      the same owner, one naming the other or a shared group is enough.
    * ``inbound_ports``: TCP ports of the guest the host itself may connect to
      (forwards are separate and always allowed).
    """

    egress: bool = False
    allow: Annotated[tuple[AllowRule, ...], Meta(max_length=MAX_ALLOW_RULES)] = ()
    peers: Annotated[tuple[str, ...], Meta(max_length=MAX_PEERS)] = ()
    groups: Annotated[tuple[str, ...], Meta(max_length=MAX_GROUPS)] = ()
    inbound_ports: Annotated[tuple[Port, ...], Meta(max_length=MAX_INBOUND_PORTS)] = ()


class Forward(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Host port -> guest port.

    From the host itself (127.0.0.1 or any host address) only connections
    made by the workspace's owner uid (and root) are forwarded; other uids
    reach whatever else is on that port (nothing: the port was free).  With
    ``external`` the port is also forwarded for traffic arriving from other
    hosts, on every host address.
    """

    host_port: Port
    guest_port: Port
    protocol: Proto = "tcp"
    external: bool = False


class WorkspaceNet(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    owner_uid: Annotated[int, Meta(ge=0, le=2**32 - 1)]
    address: str
    mac: str
    tap: str
    policy: NetPolicy = NetPolicy()
    forwards: tuple[Forward, ...] = ()


class NetState(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything the network layer persists.

    ``cursor`` is the host index of the last allocated address: allocation
    continues after it, so a freed address is the last to be handed out again.
    """

    version: int = STATE_VERSION
    cursor: Annotated[int, Meta(ge=0, le=2**32)] = 0
    workspaces: dict[str, WorkspaceNet] = msgspec.field(default_factory=dict)


# --- validation --------------------------------------------------------------------------


def check_name(name: object, what: str = "workspace name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNetInput(f"invalid {what}: {_show(name)}")
    return name


def check_ifname(name: object) -> str:
    if not isinstance(name, str) or not IFNAME_PATTERN.fullmatch(name):
        raise InvalidNetInput(f"invalid interface name: {_show(name)}")
    return name


def check_mac(mac: object) -> str:
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise InvalidNetInput(f"invalid MAC address: {_show(mac)}")
    return mac


def check_uid(uid: object) -> int:
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid <= 2**32 - 1:
        raise InvalidNetInput(f"invalid owner uid: {_show(uid)}")
    return uid


def check_port(port: object, what: str = "port") -> int:
    # bool is an int subclass; True is not a port.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidNetInput(f"{what} out of range 1-65535: {_show(port)}")
    return port


def parse_address(text: object) -> ipaddress.IPv4Address:
    """A dotted-quad IPv4 address, canonical form only (no '010.1.1.1', no IPv6)."""
    if not isinstance(text, str) or len(text) > 15:
        raise InvalidNetInput(f"invalid IPv4 address: {_show(text)}")
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidNetInput(f"invalid IPv4 address: {_show(text)}") from None
    if str(addr) != text:
        raise InvalidNetInput(f"IPv4 address not in canonical form: {_show(text)}")
    return addr


def parse_network(text: object) -> ipaddress.IPv4Network:
    """An IPv4 CIDR with no host bits set ('10.0.0.0/8'; a bare address is a /32)."""
    if not isinstance(text, str) or len(text) > 18:
        raise InvalidNetInput(f"invalid IPv4 CIDR: {_show(text)}")
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidNetInput(f"invalid IPv4 CIDR {_show(text)}: {exc}") from None
    if text not in (str(net), str(net.network_address)):
        raise InvalidNetInput(f"IPv4 CIDR not in canonical form: {_show(text)}")
    return net


def check_port_range(pr: PortRange) -> PortRange:
    check_port(pr.first)
    check_port(pr.last)
    if pr.first > pr.last:
        raise InvalidNetInput(f"port range {pr.first}-{pr.last} is reversed")
    return pr


def check_policy(policy: NetPolicy) -> NetPolicy:
    """Validate a policy whatever path it came from (decoded or built in code)."""
    if len(policy.allow) > MAX_ALLOW_RULES:
        raise InvalidNetInput(f"at most {MAX_ALLOW_RULES} allow rules")
    for rule in policy.allow:
        parse_network(rule.cidr)
        if rule.protocol not in ("tcp", "udp", "any"):
            raise InvalidNetInput(f"invalid protocol: {_show(rule.protocol)}")
        if len(rule.ports) > MAX_PORT_ITEMS:
            raise InvalidNetInput(f"at most {MAX_PORT_ITEMS} port items per allow rule")
        for pr in rule.ports:
            check_port_range(pr)
    if len(policy.peers) > MAX_PEERS or len(policy.groups) > MAX_GROUPS:
        raise InvalidNetInput("too many peers or groups")
    for peer in policy.peers:
        check_name(peer, "peer name")
    for group in policy.groups:
        check_name(group, "group name")
    if len(policy.inbound_ports) > MAX_INBOUND_PORTS:
        raise InvalidNetInput(f"at most {MAX_INBOUND_PORTS} inbound ports")
    for port in policy.inbound_ports:
        check_port(port, "inbound port")
    return policy


def check_forward(fwd: Forward, port_min: int) -> Forward:
    check_port(fwd.host_port, "host port")
    check_port(fwd.guest_port, "guest port")
    if fwd.protocol not in ("tcp", "udp"):
        raise InvalidNetInput(f"invalid forward protocol: {_show(fwd.protocol)}")
    if not isinstance(fwd.external, bool):
        raise InvalidNetInput(f"invalid forward external flag: {_show(fwd.external)}")
    if fwd.host_port < port_min:
        raise InvalidNetInput(
            f"host port {fwd.host_port} is privileged (forwards need >= {port_min})"
        )
    return fwd


def check_workspace(ws: WorkspaceNet, port_min: int) -> WorkspaceNet:
    check_name(ws.name)
    check_uid(ws.owner_uid)
    parse_address(ws.address)
    check_mac(ws.mac)
    check_ifname(ws.tap)
    check_policy(ws.policy)
    if len(ws.forwards) > MAX_FORWARDS:
        raise InvalidNetInput(f"at most {MAX_FORWARDS} forwards per workspace")
    for fwd in ws.forwards:
        check_forward(fwd, port_min)
    return ws


def _show(value: object) -> str:
    """A bounded, printable rendering of hostile input for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
