"""Network configuration: the ``[net]`` section of the helper's TOML config.

:class:`NetConfig` is the raw, msgspec-decodable form (every key optional);
:func:`parse_net_config` turns it into :class:`NetSettings`, whose fields are
``ipaddress`` objects that have been checked against each other.  Everything
downstream (pool, ruleset) takes :class:`NetSettings` only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from .errors import NetConfigError
from .model import check_ifname, parse_address, parse_network

#: Lowest host port a forward may use: ports below 1024 are privileged.
UNPRIVILEGED_PORT_MIN = 1024

#: TAP prefix: short, lowercase, so that prefix + 8 hex digits fits IFNAMSIZ-1 (15).
TAP_PREFIX_PATTERN = r"^[a-z][a-z0-9]{0,5}-?$"


DEFAULT_BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


class NetConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    bridge: Annotated[str, Meta(max_length=15)] = "br-agentiso"
    subnet: Annotated[str, Meta(max_length=43)] = "10.42.0.0/16"
    gateway: Annotated[str, Meta(max_length=15)] = "10.42.0.1"
    #: Interface names of workspace TAPs start with this; nothing else may.
    tap_prefix: Annotated[str, Meta(pattern=TAP_PREFIX_PATTERN)] = "ai-"
    #: DNS servers handed to guests; reachable on port 53 whenever egress is on.
    dns: Annotated[tuple[str, ...], Meta(max_length=4)] = ("1.1.1.1", "8.8.8.8")
    #: Set when a resolver listens on the gateway address: opens port 53 there.
    gateway_dns: bool = False
    #: Destinations no workspace may reach, whatever its policy: "this
    #: network", private (RFC 1918), CGNAT, loopback, link-local (cloud
    #: metadata), multicast and reserved.  Replace the list to allow some.
    blocked: Annotated[tuple[str, ...], Meta(max_length=64)] = DEFAULT_BLOCKED
    #: Block the IPv4 networks on the host's own interfaces (the bridge's
    #: excepted) too: the LAN the host sits on, whatever its addresses.
    block_host_networks: bool = True
    #: Destinations reachable despite ``blocked`` and the host's networks (an
    #: internal mirror, a proxy): still only for workspaces whose policy has
    #: egress and, with an allow-list, names them.
    exempt: Annotated[tuple[str, ...], Meta(max_length=64)] = ()
    forward_port_min: Annotated[int, Meta(ge=UNPRIVILEGED_PORT_MIN, le=65535)] = (
        UNPRIVILEGED_PORT_MIN
    )


@dataclass(frozen=True)
class NetSettings:
    """Validated network configuration."""

    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    tap_prefix: str
    dns: tuple[ipaddress.IPv4Address, ...]
    gateway_dns: bool
    blocked: tuple[ipaddress.IPv4Network, ...]
    forward_port_min: int
    block_host_networks: bool = True
    exempt: tuple[ipaddress.IPv4Network, ...] = ()

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


def parse_net_config(cfg: NetConfig) -> NetSettings:
    """Check a :class:`NetConfig` and return its typed form (pure).

    Raises :class:`NetConfigError` for anything inconsistent: a bridge name
    that is not a safe interface name or that starts with the TAP prefix, a
    subnet too small or too large, a gateway outside the subnet.
    """
    try:
        bridge = check_ifname(cfg.bridge)
        subnet = parse_network(cfg.subnet)
        gateway = parse_address(cfg.gateway)
        dns = tuple(parse_address(a) for a in cfg.dns)
        blocked = tuple(parse_network(n) for n in cfg.blocked)
        exempt = tuple(parse_network(n) for n in cfg.exempt)
    except NetConfigError:
        raise
    except Exception as exc:  # InvalidNetInput from the parsers
        raise NetConfigError(f"net config: {exc}") from None
    if not 8 <= subnet.prefixlen <= 29:
        raise NetConfigError(f"net config: subnet {subnet} must be between /8 and /29")
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise NetConfigError(f"net config: gateway {gateway} is not a host of {subnet}")
    if bridge.startswith(cfg.tap_prefix):
        raise NetConfigError(f"net config: bridge {bridge!r} starts with the TAP prefix")
    return NetSettings(
        bridge=bridge,
        subnet=subnet,
        gateway=gateway,
        tap_prefix=cfg.tap_prefix,
        dns=dns,
        gateway_dns=cfg.gateway_dns,
        blocked=blocked,
        forward_port_min=cfg.forward_port_min,
        block_host_networks=cfg.block_host_networks,
        exempt=exempt,
    )


def default_settings() -> NetSettings:
    return parse_net_config(NetConfig())
