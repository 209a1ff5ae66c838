"""The ``[storage]`` section of the helper configuration.

Every key is optional.  ``backend = "qcow2"`` (default) needs only ``qemu-img``;
``backend = "zfs"`` needs an imported pool whose name is the first component of
``dataset``.  Example::

    [storage]
    backend = "zfs"
    max_volume_bytes = 1099511627776

    [storage.zfs]
    dataset = "tank/agentiso"
    zvols = true          # omit to auto-detect (zfs-fuse has no zvols)
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .names import GIB, MIB, TIB

#: A ZFS dataset path: components of ZFS's own safe characters, no '@' or '%'.
_DATASET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}){0,7}$"


class ZfsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: Root dataset; the pool is its first component.  images/ and volumes/ live below.
    dataset: Annotated[str, Meta(pattern=_DATASET_PATTERN)] = "tank/agentiso"
    #: True: volumes are zvols.  False: a raw disk.img inside a filesystem dataset.
    #: None: try a zvol once at start-up and use file mode if the pool cannot make one.
    zvols: bool | None = None
    #: Set on the root dataset and inherited.  If the pool refuses it (zfs-fuse knows
    #: no lz4), ``compression_fallback`` is used instead.
    compression: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,16}$")] = "lz4"
    compression_fallback: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,16}$")] = "on"
    #: volblocksize of zvols (bytes, a power of two).
    volblocksize: Annotated[int, Meta(ge=4096, le=131072)] = 16384


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    backend: Literal["qcow2", "zfs"] = "qcow2"
    #: Smallest and largest volume size a request may ask for.
    min_volume_bytes: Annotated[int, Meta(ge=MIB, le=1024 * TIB)] = 64 * MIB
    max_volume_bytes: Annotated[int, Meta(ge=MIB, le=1024 * TIB)] = 2 * TIB
    #: Seconds any single qemu-img/zfs command may take before it is killed.
    command_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 600.0
    zfs: ZfsConfig = msgspec.field(default_factory=ZfsConfig)
    #: Snapshots one uid may hold (all its volumes together), memory ones included.
    per_uid_snapshots: Annotated[int, Meta(ge=0, le=100_000)] = 256
    #: Bytes of saved VM memory (memory snapshots) one uid may hold.  A new
    #: memory snapshot counts as its VM's RAM until its real size is known.
    per_uid_memory_state_bytes: Annotated[int, Meta(ge=0, le=1024 * TIB)] = 32 * GIB
    #: Free bytes the state filesystem keeps: volume creates and snapshots that
    #: would go below are refused (the registry and logs still have room).
    reserve_free_bytes: Annotated[int, Meta(ge=0, le=1024 * TIB)] = 1 * GIB
