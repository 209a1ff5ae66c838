"""Classes of privileged operation, one per polkit action (polkit/*.policy).

Every request type the helper serves belongs to exactly one class; a test
checks that this table covers the whole request union and matches the policy
file, so a new request cannot be added without deciding who may make it.
"""

from __future__ import annotations

import enum
from typing import Any

from agentiso.protocol import helper as hp


class Action(enum.StrEnum):
    SESSION = "org.agentiso.helper.session"
    VM = "org.agentiso.helper.vm"
    VOLUME = "org.agentiso.helper.volume"
    NETWORK = "org.agentiso.helper.network"
    GUEST = "org.agentiso.helper.guest"
    ADMIN = "org.agentiso.helper.admin"


#: Which class each request belongs to.
ACTION_FOR_REQUEST: dict[type[Any], Action] = {
    hp.Hello: Action.SESSION,
    hp.Ping: Action.SESSION,
    hp.WhoAmI: Action.SESSION,
    hp.ImageList: Action.SESSION,
    hp.VolumeCreate: Action.VOLUME,
    hp.VolumeDestroy: Action.VOLUME,
    hp.VolumeGet: Action.VOLUME,
    hp.VolumeList: Action.VOLUME,
    hp.VolumeGrow: Action.VOLUME,
    hp.SnapshotCreate: Action.VOLUME,
    hp.SnapshotRollback: Action.VOLUME,
    hp.SnapshotDelete: Action.VOLUME,
    hp.VmStart: Action.VM,
    hp.VmStop: Action.VM,
    hp.VmGet: Action.VM,
    hp.VmList: Action.VM,
    hp.VmConsole: Action.VM,
    hp.VmNetworkSet: Action.NETWORK,
    hp.ForwardAdd: Action.NETWORK,
    hp.ForwardRemove: Action.NETWORK,
    hp.GuestOpen: Action.GUEST,
    hp.AdminList: Action.ADMIN,
    hp.Gc: Action.ADMIN,
}

#: Classes only root may use.
ADMIN_ONLY = frozenset({Action.ADMIN})
