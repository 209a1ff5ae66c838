"""Names and link-layer addresses derived from an IPv4 address (pure).

Deriving instead of choosing makes them reproducible after a helper restart
and unique for as long as the address is allocated:

* TAP name: ``<tap_prefix>`` + the 8 hex digits of the address
  (``ai-0a2a0002`` for 10.42.0.2): at most 7 + 8 = 15 characters (IFNAMSIZ-1),
  only ``[a-z0-9-]``.
* MAC: ``02:a6`` + the 4 bytes of the address.  ``0x02`` sets the
  locally-administered bit and clears the multicast bit, so it never collides
  with a vendor-assigned MAC.
"""

from __future__ import annotations

import ipaddress

from .errors import InvalidNetInput
from .model import IFNAME_PATTERN

MAC_PREFIX = (0x02, 0xA6)


def tap_name(prefix: str, address: ipaddress.IPv4Address) -> str:
    name = f"{prefix}{int(address):08x}"
    if not IFNAME_PATTERN.fullmatch(name):
        raise InvalidNetInput(f"TAP prefix {prefix!r} yields an invalid interface name")
    return name


def mac_for(address: ipaddress.IPv4Address) -> str:
    octets = (*MAC_PREFIX, *address.packed)
    return ":".join(f"{b:02x}" for b in octets)


def bridge_mac(gateway: ipaddress.IPv4Address) -> str:
    """A fixed MAC for the bridge, so it does not change as ports come and go.

    The gateway address is never allocated to a workspace, so this cannot
    collide with a workspace MAC.
    """
    return mac_for(gateway)
