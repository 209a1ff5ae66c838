"""Client policy names <-> network-layer names (pure).

Clients name peer VMs and groups; the network layer sees registry keys and
per-owner group names, so two users' names never meet.
"""

from __future__ import annotations

import msgspec

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from ..errors import RequestFailed
from ..net.model import NetPolicy
from ..registry import Registry


def to_net_policy(registry: Registry, owner: int, wire: hp.NetworkPolicy) -> NetPolicy:
    """The wire policy with peer VM names turned into their keys."""
    raw = msgspec.to_builtins(wire)
    raw["peers"] = [registry.vm(owner, name).key for name in wire.peers]
    # Groups are per owner: prefix them so two users' "dev" never meet.
    raw["groups"] = [f"u{owner}-{g}"[:63] for g in wire.groups]
    try:
        return msgspec.convert(raw, NetPolicy)
    except msgspec.ValidationError as exc:
        raise RequestFailed(ErrorCode.INVALID, f"network policy: {exc}") from None


def to_wire_policy(registry: Registry, owner: int, policy: NetPolicy) -> hp.NetworkPolicy:
    """What :func:`to_net_policy` made, back in the owner's names."""
    raw = msgspec.to_builtins(policy)
    names = {m.key: m.name for m in registry.vms(owner)}
    raw["peers"] = [names[k] for k in policy.peers if k in names]
    prefix = f"u{owner}-"
    raw["groups"] = [g[len(prefix):] for g in policy.groups if g.startswith(prefix)]
    return msgspec.convert(raw, hp.NetworkPolicy)
