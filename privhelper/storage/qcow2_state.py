"""On-disk layout and metadata logic of the qcow2 backend (pure, no I/O).

Layout under the backend's root directory::

    images/<base>.qcow2        immutable bases (mode 0400)
    layers/<id>.qcow2          every overlay file; ids are random hex, never names
    volumes/<volume>.json      one metadata file per volume (written atomically)
    tmp/                       files being built; renamed into place when complete

A volume is a *chain* of layers over a base: ``base <- chain[0] <- ... <- chain[-1]``.
The last layer is the **top**, the only file QEMU writes.  A snapshot is the
name of a layer that used to be the top: taking one freezes the top and puts a
new empty top over it (so it works for a running VM: QEMU switches to the new
file).  A clone of ``v@s`` is a volume whose chain is ``v``'s chain up to the
snapshot's layer plus a new top: O(1), sharing every byte.

Layers are shared by path, so they live in one flat directory and never move;
a layer file is deleted when no volume's chain contains it any more.  That is
how a clone outlives the volume it was cloned from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .errors import CorruptState, HasDependents, InvalidName, NotFound
from .model import BlockNode, ImageFormat, Protocol, SnapshotDeletion
from .names import check_name

METADATA_VERSION = 1
#: Layer ids are 24 random hex digits (never client input); they become file names.
LAYER_ID = re.compile(r"[0-9a-f]{24}")


class SnapshotRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    layer: str
    virtual_size: int


class VolumeMeta(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    version: int
    name: str
    base: str
    origin: str
    #: Creation order among volumes (owner of shared layers = oldest user).
    seq: int
    virtual_size: int
    #: Layer ids, bottom first; the last one is the top.
    chain: list[str]
    #: Oldest first; each layer is in ``chain`` (never the top).
    snapshots: list[SnapshotRecord] = []

    @property
    def top(self) -> str:
        return self.chain[-1]

    def snapshot(self, name: str) -> SnapshotRecord:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise NotFound("snapshot", f"{self.name}@{name}")


_meta_decoder = msgspec.json.Decoder(VolumeMeta)


def encode_meta(meta: VolumeMeta) -> bytes:
    return msgspec.json.format(msgspec.json.encode(meta), indent=1) + b"\n"


def decode_meta(data: bytes, source: str) -> VolumeMeta:
    """Parse and validate a volume's metadata: every id and name in it becomes a path."""
    try:
        meta = _meta_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptState(f"{source}: {exc}") from None
    if meta.version != METADATA_VERSION or not meta.chain:
        raise CorruptState(f"{source}: unsupported or empty volume metadata")
    try:
        for kind, name in [
            ("volume", meta.name),
            ("base", meta.base),
            *(("snapshot", s.name) for s in meta.snapshots),
        ]:
            check_name(kind, name)
    except InvalidName as exc:
        raise CorruptState(f"{source}: {exc.message}") from None
    layers = set(meta.chain)
    if len(layers) != len(meta.chain) or not all(LAYER_ID.fullmatch(lay) for lay in layers):
        raise CorruptState(f"{source}: malformed layer chain")
    if any(s.layer not in layers or s.layer == meta.top for s in meta.snapshots):
        raise CorruptState(f"{source}: a snapshot names a layer outside the chain")
    return meta


@dataclass(frozen=True)
class Layout:
    """Paths of the qcow2 backend; every name passed in is already validated."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def dirs(self) -> tuple[Path, ...]:
        return (self.images, self.layers, self.volumes, self.tmp)

    def base(self, name: str) -> Path:
        return self.images / f"{name}.qcow2"

    def layer(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2"

    def meta(self, volume: str) -> Path:
        return self.volumes / f"{volume}.json"

    def backing_of(self, meta: VolumeMeta, index: int) -> Path:
        """Path of the image below ``chain[index]``."""
        return self.base(meta.base) if index == 0 else self.layer(meta.chain[index - 1])


# --- pure queries over all volumes' metadata -------------------------------------


def layer_users(metas: Iterable[VolumeMeta]) -> dict[str, list[VolumeMeta]]:
    """layer id -> volumes whose chain contains it, oldest (lowest seq) first."""
    users: dict[str, list[VolumeMeta]] = {}
    for m in sorted(metas, key=lambda m: m.seq):
        for layer in m.chain:
            users.setdefault(layer, []).append(m)
    return users


def owned_layers(meta: VolumeMeta, users: Mapping[str, list[VolumeMeta]]) -> list[str]:
    """Layers whose space is counted to ``meta``: those it is the oldest user of."""
    return [lay for lay in meta.chain if users.get(lay, [meta])[0].name == meta.name]


def snapshot_dependents(meta: VolumeMeta, snapshot: str, metas: Iterable[VolumeMeta]) -> list[str]:
    """Other volumes built on ``meta``'s snapshot layer (clones of it or of later ones)."""
    layer = meta.snapshot(snapshot).layer
    return sorted(m.name for m in metas if m.name != meta.name and layer in m.chain)


def base_dependents(base: str, metas: Iterable[VolumeMeta]) -> list[str]:
    return sorted(m.name for m in metas if m.base == base)


def next_seq(metas: Iterable[VolumeMeta]) -> int:
    return max((m.seq for m in metas), default=0) + 1


@dataclass(frozen=True)
class RollbackPlan:
    #: The metadata after rollback (top replaced by ``new_top``).
    meta: VolumeMeta
    #: Layers of the old chain above the snapshot's: delete if nobody else uses them.
    dropped: tuple[str, ...]


def plan_rollback(
    meta: VolumeMeta, snapshot: str, new_top: str, metas: Iterable[VolumeMeta]
) -> RollbackPlan:
    """Rollback = new empty top over the snapshot's layer; later snapshots go.

    Raises HasDependents if another volume is built on a layer that would go.
    """
    snap = meta.snapshot(snapshot)
    idx = meta.chain.index(snap.layer)
    dropped = tuple(meta.chain[idx + 1 :])
    others = [m for m in metas if m.name != meta.name]
    blocking = sorted({m.name for m in others for lay in dropped if lay in m.chain})
    if blocking:
        raise HasDependents("snapshot", _later_names(meta, snapshot), blocking)
    pos = [s.name for s in meta.snapshots].index(snapshot)
    new = msgspec.structs.replace(
        meta,
        chain=[*meta.chain[: idx + 1], new_top],
        snapshots=list(meta.snapshots[: pos + 1]),
        virtual_size=snap.virtual_size,
    )
    return RollbackPlan(new, dropped)


def _later_names(meta: VolumeMeta, snapshot: str) -> str:
    names = [s.name for s in meta.snapshots]
    later = names[names.index(snapshot) + 1 :]
    return f"{meta.name}@{snapshot}" + (f" (and later: {', '.join(later)})" if later else "")


@dataclass(frozen=True)
class DeleteSnapshotPlan:
    meta: VolumeMeta
    #: The layer file to delete once its child is rebased.
    layer: str
    #: The layer just above it, which receives its data (``qemu-img rebase``).
    child: str
    #: Index in the *new* chain of ``child`` (its backing is ``backing_of(new, idx)``).
    child_index: int


def plan_delete_snapshot(
    meta: VolumeMeta, snapshot: str, metas: Iterable[VolumeMeta]
) -> DeleteSnapshotPlan:
    """Remove a snapshot by merging its layer into the layer above it.

    Raises HasDependents if another volume's chain contains the layer (a clone
    of this snapshot or of a later one): rewriting it under them is refused.
    """
    deps = snapshot_dependents(meta, snapshot, metas)
    if deps:
        raise HasDependents("snapshot", f"{meta.name}@{snapshot}", deps)
    layer = meta.snapshot(snapshot).layer
    idx = meta.chain.index(layer)
    if idx + 1 >= len(meta.chain):
        raise CorruptState(f"volume {meta.name!r}: snapshot layer is the top")
    child = meta.chain[idx + 1]
    new = msgspec.structs.replace(
        meta,
        chain=[lay for lay in meta.chain if lay != layer],
        snapshots=[s for s in meta.snapshots if s.name != snapshot],
    )
    return DeleteSnapshotPlan(new, layer, child, idx)


def deletion_token(plan: DeleteSnapshotPlan) -> str:
    """Names the deletion's layers: a commit whose fresh plan has another
    token finds the volume changed since the prepare."""
    return f"{plan.layer}:{plan.child}"


def describe_deletion(
    layout: Layout, meta: VolumeMeta, plan: DeleteSnapshotPlan, volume: str, snapshot: str
) -> SnapshotDeletion:
    """What deleting ``snapshot`` of ``meta`` (planned as ``plan``) asks of a
    running QEMU: stream into the top when the merged layer's child is the
    top, and the nodes before and after."""

    def node(path: Path, read_only: bool) -> BlockNode:
        return BlockNode(path, ImageFormat.QCOW2, Protocol.FILE, read_only)

    return SnapshotDeletion(
        volume=volume,
        snapshot=snapshot,
        stream_into=node(layout.layer(plan.child), False) if plan.child == meta.top else None,
        new_backing=node(layout.backing_of(plan.meta, plan.child_index), True),
        removed=node(layout.layer(plan.layer), True),
        token=deletion_token(plan),
    )


def unreferenced(layers: Iterable[str], metas: Iterable[VolumeMeta]) -> list[str]:
    """Those of ``layers`` no volume's chain contains any more."""
    used = {lay for m in metas for lay in m.chain}
    return [lay for lay in layers if lay not in used]
