"""Address allocation from the configured subnet (pure).

An address is allocated to a workspace until the workspace is destroyed; it is
never handed to another while allocated.  Allocation walks the subnet
round-robin from the last allocated index (``NetState.cursor``), so a freed
address is reused as late as possible (stale ARP caches and conntrack entries
of a destroyed workspace never meet its successor in practice).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .config import NetSettings
from .errors import NetConflict, PoolExhausted


def host_index_range(settings: NetSettings) -> range:
    """Indices (offsets from the network address) of usable host addresses."""
    return range(1, settings.subnet.num_addresses - 1)


def allocate(
    settings: NetSettings, used: Iterable[str], cursor: int, prefer: str | None = None
) -> tuple[ipaddress.IPv4Address, int]:
    """Return a free address and the new cursor.

    ``used`` is every allocated address (strings, as in the state).  The gateway
    is never returned.  ``prefer`` (a VM resumed from a memory snapshot wants
    the address its guest still has) is returned if it is a free host address
    of the subnet; otherwise :class:`NetConflict`.  Raises
    :class:`PoolExhausted` when nothing is left.
    """
    taken = {int(ipaddress.IPv4Address(a)) for a in used}
    taken.add(int(settings.gateway))
    base = int(settings.subnet.network_address)
    hosts = host_index_range(settings)
    if prefer is not None:
        want = ipaddress.IPv4Address(prefer)
        idx = int(want) - base
        if want not in settings.subnet or idx not in hosts or int(want) in taken:
            raise NetConflict(f"address {prefer} is not free in {settings.subnet}")
        return want, cursor
    n = len(hosts)
    start = cursor if hosts.start <= cursor < hosts.stop else hosts.start - 1
    for step in range(1, n + 1):
        idx = hosts.start + (start - hosts.start + step) % n
        if base + idx not in taken:
            return ipaddress.IPv4Address(base + idx), idx
    raise PoolExhausted(f"no free address left in {settings.subnet}")


def capacity(settings: NetSettings) -> int:
    """How many workspaces the subnet can hold (hosts minus the gateway)."""
    return len(host_index_range(settings)) - 1
