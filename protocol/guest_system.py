"""Guest requests that change the VM as a system: its hostname, its network,
and its whole identity after a resume from saved memory."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec
from msgspec import Meta

from .guest_types import (
    DnsDomain,
    Entropy,
    Hostname,
    IfName,
    IpText,
    Mac,
    MachineId,
    Msg,
    TimeNs,
    check_ip,
)

Prefix = Annotated[int, Meta(ge=0, le=128)]
DnsServers = Annotated[list[IpText], Meta(max_length=3)]


def _check_address(address: str, prefix: int, gateway: str | None, dns: list[str]) -> None:
    check_ip(address, "address")
    limit = 32 if ipaddress.ip_address(address).version == 4 else 128
    if prefix > limit:
        raise ValueError(f"prefix above {limit}")
    if gateway is not None:
        check_ip(gateway, "gateway")
    for server in dns:
        check_ip(server, "dns server")


class SetHostname(Msg, tag="set_hostname"):
    hostname: Hostname


class ConfigureNetwork(Msg, tag="configure_network"):
    """Bring up the interface with ``mac`` (or ``interface``), give it
    ``address/prefix``, default route via ``gateway``, and write /etc/resolv.conf
    when ``dns`` is given."""

    address: IpText
    prefix: Prefix
    mac: Mac | None = None
    interface: IfName | None = None
    gateway: IpText | None = None
    dns: DnsServers = msgspec.field(default_factory=list)
    search: Annotated[list[DnsDomain], Meta(max_length=6)] = msgspec.field(default_factory=list)
    mtu: Annotated[int, Meta(ge=576, le=65535)] | None = None

    def __post_init__(self) -> None:
        if (self.mac is None) == (self.interface is None):
            raise ValueError("exactly one of mac and interface must be given")
        if self.interface in (".", ".."):
            raise ValueError("bad interface name")
        _check_address(self.address, self.prefix, self.gateway, self.dns)


class Reidentify(Msg, tag="reidentify"):
    """Take a new identity: the VM was resumed from memory saved by another
    (a fork), so it still carries that one's MAC, address, hostname,
    machine-id, random state and clock.  The host keeps the NIC's link down
    until this is answered.

    The agent (PID 1 only), in this order: mixes ``entropy`` into the kernel
    pool and forces a CRNG reseed (no two forks share random output from
    here on); steps the clock to ``time_ns``; writes /etc/machine-id; sets the
    hostname; gives the NIC (the one whose MAC is ``old_mac``, else the one
    that already has ``mac``, else the only one that is not loopback) the MAC
    ``mac``, then ``address/prefix``, the default route via ``gateway`` and
    /etc/resolv.conf from ``dns``.  Ok only when every step succeeded; else
    an Error whose message names the failed step (steps before it stay done:
    the host discards a VM whose re-identification failed).
    """

    mac: Mac
    address: IpText
    prefix: Prefix
    hostname: Hostname
    machine_id: MachineId
    entropy: Entropy
    time_ns: TimeNs
    gateway: IpText | None = None
    dns: DnsServers = msgspec.field(default_factory=list)
    #: The MAC the NIC had when the memory was saved, when the host knows it.
    old_mac: Mac | None = None

    def __post_init__(self) -> None:
        _check_address(self.address, self.prefix, self.gateway, self.dns)
        if self.machine_id == "0" * 32:
            raise ValueError("machine_id must not be all zero")
