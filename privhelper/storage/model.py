"""Plain values the volume layer hands out (frozen dataclasses, no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class ImageFormat(enum.StrEnum):
    """Formats of a node in QEMU's ``-blockdev`` sense."""

    QCOW2 = "qcow2"
    RAW = "raw"


class Protocol(enum.StrEnum):
    """QEMU protocol driver below the format node."""

    FILE = "file"  # a regular file
    HOST_DEVICE = "host_device"  # a block device node (zvol)


@dataclass(frozen=True)
class BlockNode:
    """One image of a volume's chain, as QEMU must open it."""

    path: Path
    format: ImageFormat
    protocol: Protocol
    read_only: bool


@dataclass(frozen=True)
class Attachment:
    """How the VM engine attaches a volume.

    ``chain[0]`` is the writable top QEMU writes; each following node is the
    backing of the one before it (read-only), down to the base.  A raw volume
    (ZFS) has a one-node chain.  The VM engine may let QEMU follow the backing
    references recorded in the qcow2 headers (``-blockdev`` of the top with
    ``driver=qcow2``) or declare every node itself (needed when it passes file
    descriptors instead of paths).  ``rw_paths`` must be readable and writable by
    QEMU's unprivileged uid, ``ro_paths`` readable.
    """

    volume: str
    chain: tuple[BlockNode, ...]
    virtual_size: int

    @property
    def top(self) -> BlockNode:
        return self.chain[0]

    @property
    def rw_paths(self) -> tuple[Path, ...]:
        return tuple(n.path for n in self.chain if not n.read_only)

    @property
    def ro_paths(self) -> tuple[Path, ...]:
        return tuple(n.path for n in self.chain if n.read_only)


@dataclass(frozen=True)
class BaseInfo:
    name: str
    virtual_size: int
    used_bytes: int
    #: Volumes created from this base that still exist.
    dependents: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotInfo:
    volume: str
    name: str
    #: Size the volume had when the snapshot was taken.
    virtual_size: int
    #: Bytes held only because this snapshot exists.
    used_bytes: int
    #: Volumes cloned from this snapshot that still exist.
    dependents: tuple[str, ...] = ()


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    virtual_size: int
    #: Bytes actually allocated for this volume (its own data and its snapshots'),
    #: not counting what it shares with its base or origin.
    used_bytes: int
    #: "base:<name>" or "snapshot:<volume>@<snapshot>": what it was created from.
    origin: str
    #: Oldest first.
    snapshots: tuple[SnapshotInfo, ...] = field(default=())


@dataclass(frozen=True)
class FromBase:
    """Create a volume from a base image."""

    base: str


@dataclass(frozen=True)
class FromSnapshot:
    """Create a volume from another volume's snapshot."""

    volume: str
    snapshot: str


VolumeSource = FromBase | FromSnapshot


@dataclass(frozen=True)
class SnapshotPlan:
    """A snapshot in the making; see :meth:`VolumeBackend.prepare_snapshot`.

    ``new_top`` is set when the backend snapshots by switching the volume to a
    fresh overlay (qcow2).  For a running VM the engine must make QEMU write to
    that file before :meth:`commit_snapshot` (QMP ``blockdev-add`` of ``new_top``
    with ``backing: null`` then ``blockdev-snapshot`` with the current top as
    ``node`` and the new node as ``overlay``; or ``blockdev-snapshot-sync`` with
    ``mode: existing``).  The file already exists, with the right backing
    reference, size and ownership.  When ``new_top`` is None (ZFS) the snapshot
    is atomic in the backend: the engine only freezes the guest around
    :meth:`commit_snapshot`.
    """

    volume: str
    snapshot: str
    new_top: BlockNode | None
    #: The node QEMU writes now (the ``node`` of ``blockdev-snapshot``).
    current_top: BlockNode
    #: Backend-private token (e.g. the layer ids), opaque to the engine.
    token: str = ""


@dataclass(frozen=True)
class SnapshotDeletion:
    """A snapshot deletion in the making; see :meth:`VolumeBackend.prepare_delete_snapshot`.

    ``stream_into`` is set when the snapshot's data can be merged while a VM runs
    (qcow2, the snapshot is the newest: its layer lies right under the top).  For a
    running VM the engine then runs QMP ``block-stream`` with ``device`` = the
    node of ``stream_into`` (the top), ``base-node`` = the node of ``new_backing``
    and ``backing-file`` = ``str(new_backing.path)`` (so the header records the
    real path, not an fd-set name), waits for the job to complete, may
    ``blockdev-del`` the node of ``removed``, and calls
    ``commit_delete_snapshot(plan, streamed=True)``.  A stopped VM, or a plan
    without ``stream_into`` (ZFS deletes under a running VM; older qcow2
    snapshots need the VM stopped), is completed by
    ``commit_delete_snapshot(plan)`` alone.
    """

    volume: str
    snapshot: str
    stream_into: BlockNode | None = None
    new_backing: BlockNode | None = None
    removed: BlockNode | None = None
    token: str = ""
