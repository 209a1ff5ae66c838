"""Volumes: workspace disks behind one interface, two backends.

* :class:`~.backend.VolumeBackend` — the interface and its semantics;
* :class:`~.qcow2.Qcow2Backend` — chains of qcow2 overlays (default);
* :class:`~.zfs.ZfsBackend` — ZFS clones and snapshots, zvols or raw files;
* :func:`~.factory.make_backend` — the one the config names;
* :mod:`.errors` — typed errors, each with the protocol ``code`` to answer.

The design is written up in docs/storage.md.
"""

from .backend import VolumeBackend
from .config import StorageConfig, ZfsConfig
from .errors import StorageError
from .factory import make_backend
from .model import (
    Attachment,
    BaseInfo,
    BlockNode,
    FromBase,
    FromSnapshot,
    SnapshotDeletion,
    SnapshotInfo,
    SnapshotPlan,
    VolumeInfo,
)

__all__ = [
    "Attachment",
    "BaseInfo",
    "BlockNode",
    "FromBase",
    "FromSnapshot",
    "SnapshotDeletion",
    "SnapshotInfo",
    "SnapshotPlan",
    "StorageConfig",
    "StorageError",
    "VolumeBackend",
    "VolumeInfo",
    "ZfsConfig",
    "make_backend",
]
