"""Adapter: the bridge, bridge ports, sysctls and link clean-up (netlink via pyroute2).

Everything acts on the network namespace of the calling thread, which in
production is the host's; the integration tests run it inside a namespace they
created (see tests/harness/netns.py).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agentiso.protocol.errors import ErrorCode

from .config import NetSettings
from .errors import NetConflict, NetSystemError
from .model import check_ifname
from .naming import bridge_mac

PROC_SYS_NET = Path("/proc/sys/net")


class Links:
    """Netlink operations the network layer needs.

    Not thread-safe: the netlink socket is opened on first use, in the network
    namespace of the thread that uses it first; NetworkManager serialises calls.
    """

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=check_ifname(name))
        return int(found[0]) if found else None

    def kind(self, index: int) -> str | None:
        link = self.ipr.get_links(index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        return None if info is None else info.get_attr("IFLA_INFO_KIND")

    def names(self) -> list[str]:
        return sorted(str(link.get_attr("IFLA_IFNAME")) for link in self.ipr.get_links())

    def ensure_bridge(self, s: NetSettings) -> int:
        """Create the bridge if missing; make sure it is up with the gateway address.

        STP is off (its listening delay would hold new ports for 15 s and we have
        no loops) and the MAC is fixed so it does not follow the lowest port MAC.
        ``route_localnet`` lets DNATed 127.0.0.1 traffic leave through the bridge
        (it is masqueraded to the gateway address on the way out).
        """
        try:
            idx = self.index(s.bridge)
            if idx is None:
                self.ipr.link(
                    "add",
                    ifname=s.bridge,
                    kind="bridge",
                    br_stp_state=0,
                    br_forward_delay=0,
                    address=bridge_mac(s.gateway),
                )
                idx = self.index(s.bridge)
                if idx is None:
                    raise NetSystemError(f"bridge {s.bridge} vanished after creation")
            elif self.kind(idx) != "bridge":
                raise NetConflict(f"{s.bridge} exists and is not a bridge")
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in self.ipr.get_addr(index=idx, family=2)
            }
            if (str(s.gateway), s.prefixlen) not in have:
                self.ipr.addr("add", index=idx, address=str(s.gateway), prefixlen=s.prefixlen)
            self.ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise NetSystemError(f"bridge {s.bridge}: {exc}") from None
        set_sysctl(f"ipv4/conf/{s.bridge}/route_localnet", "1")
        # Guests are IPv4-only; the host needs no IPv6 link-local on the bridge.
        if (PROC_SYS_NET / f"ipv6/conf/{s.bridge}/disable_ipv6").exists():
            set_sysctl(f"ipv6/conf/{s.bridge}/disable_ipv6", "1")
        return idx

    def host_networks(self, exclude: str) -> list[str]:
        """The IPv4 networks (CIDRs) of every address on an interface other
        than ``exclude`` (the bridge, whose subnet the workspaces share)."""
        skip = self.index(exclude)
        nets = set()
        for msg in self.ipr.get_addr(family=socket.AF_INET):
            if msg["index"] == skip:
                continue
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if addr:
                net = ipaddress.IPv4Interface(f"{addr}/{msg['prefixlen']}").network
                nets.add(str(net))
        return sorted(nets)

    def enslave(self, name: str, bridge: str) -> None:
        """Put ``name`` on ``bridge`` and bring it up."""
        br = self.index(bridge)
        idx = self.index(name)
        if br is None or idx is None:
            raise NetSystemError(f"cannot attach {name} to {bridge}: link missing")
        try:
            self.ipr.link("set", index=idx, master=br, state="up")
        except NetlinkError as exc:
            raise NetSystemError(f"attach {name} to {bridge}: {exc}") from None

    def delete(self, name: str) -> bool:
        """Delete link ``name``; False if it did not exist."""
        idx = self.index(name)
        if idx is None:
            return False
        try:
            self.ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: went away meanwhile (its last fd closed)
                return False
            raise NetSystemError(f"delete {name}: {exc}") from None
        return True


def set_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/net/<key>`` if it differs."""
    path = PROC_SYS_NET / key
    try:
        if path.read_text().strip() != value:
            path.write_text(value + "\n")
    except OSError as exc:
        raise NetSystemError(f"sysctl net/{key}: {exc.strerror}", ErrorCode.UNAVAILABLE) from None


def get_sysctl(key: str) -> str:
    return (PROC_SYS_NET / key).read_text().strip()
