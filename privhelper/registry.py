"""The helper's registry: every volume and VM it holds, with its owner uid.

Names are per owner: uid 1000's volume ``ws`` and uid 1001's volume ``ws`` are
different volumes, and neither uid can learn that the other's exists (a
lookup of someone else's resource is :class:`~agentiso.protocol.errors.NotFound`,
exactly as for a name nobody uses).  Below this layer, resources are known by a
random ``key`` (``v`` + 12 hex digits for volumes, ``m`` + 12 for VMs) that is
a valid backend name whatever the owner's name was.

The registry is one msgpack-free JSON document written atomically (temp file,
fsync, rename, fsync of the directory), so a crash leaves either the old or
the new state, never a torn one.  All methods are synchronous and cheap; the
caller serialises mutations (one lock in the service layer).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Literal

import msgspec

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from .atomicfile import atomic_write
from .errors import RequestFailed

REGISTRY_VERSION = 1
#: VMs a time limit ended are remembered until their owner forgets them; a
#: uid that never does (a new name each time) cannot grow the registry
#: beyond this many.
MAX_ENDED_PER_OWNER = 256


class SnapshotRecord(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    created: float
    #: File name (in the VM state directory) of the saved memory, if any.
    memory_file: str | None = None
    #: The VM's network address when the memory was saved: the resumed guest
    #: still has it (and its MAC), so a resume asks the pool for it again.
    address: str | None = None
    #: The saving VM's size: a resumed VM must have the same (QEMU refuses
    #: a state of another RAM size).  None in records older than the field.
    vcpus: int | None = None
    memory_mib: int | None = None
    #: vsock only: the secret (hex) the saving VM's agent demands; a VM
    #: resumed from this memory demands it too.
    secret: str | None = None


class VolumeRecord(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    owner: int
    name: str
    created: float
    origin: str
    size_bytes: int
    #: The guest image whose kernel boots this volume (its root ancestor).
    image: str = ""
    snapshots: list[SnapshotRecord] = msgspec.field(default_factory=list)
    #: ``<source volume key>@<snapshot>`` while this volume is a clone of that
    #: snapshot on which no VM has run yet: only then may the snapshot's
    #: memory be resumed on it (``VmStart(resume_from=...)``).
    pristine_clone_of: str | None = None
    #: The machine-id the helper gave the machine on this volume (at its
    #: first boot, or a fork's new one).  None: the next boot gives one; a
    #: new volume, a clone included, is a new machine.
    machine_id: str | None = None

    def snapshot(self, name: str) -> SnapshotRecord:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise RequestFailed(
            ErrorCode.NOT_FOUND, f"volume {self.name!r} has no snapshot {name!r}"
        )


class VmRecord(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    owner: int
    name: str
    volume_key: str
    vcpus: int
    memory_mib: int
    created: float
    #: vsock channel only: the guest's CID and the secret its agent demands
    #: (hex).  Kept for the relay to reconnect after a helper restart.
    cid: int | None = None
    secret: str | None = None
    #: Set once the VM has started (a starting VM is never ended by a limit);
    #: lifetime counts from ``created``.
    time_limits: hp.TimeLimits | None = None


class EndedVmRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A VM a time limit ended: it holds nothing any more, but its owner can
    still learn why until the next VmStop or VmStart of its name."""

    owner: int
    name: str
    #: The volume's name as its owner knew it (it may be destroyed).
    volume: str
    vcpus: int
    memory_mib: int
    created: float
    time_limits: hp.TimeLimits
    limit: Literal["idle", "lifetime"]
    at: float
    action: hp.TimeLimitAction
    reason: str


class RegistryData(msgspec.Struct, forbid_unknown_fields=True):
    version: int = REGISTRY_VERSION
    volumes: list[VolumeRecord] = msgspec.field(default_factory=list)
    vms: list[VmRecord] = msgspec.field(default_factory=list)
    ended: list[EndedVmRecord] = msgspec.field(default_factory=list)


class Registry:
    """In-memory registry backed by an atomically replaced JSON file."""

    def __init__(self, path: Path, data: RegistryData | None = None) -> None:
        self.path = path
        self.data = data if data is not None else RegistryData()

    # --- persistence -------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        try:
            data = msgspec.json.decode(raw, type=RegistryData)
        except msgspec.DecodeError as exc:
            raise RequestFailed(
                ErrorCode.INTERNAL, f"registry {path} is corrupt: {exc}"
            ) from None
        return cls(path, data)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.format(msgspec.json.encode(self.data)))

    # --- volumes -----------------------------------------------------------------------

    def volume(self, owner: int, name: str) -> VolumeRecord:
        for v in self.data.volumes:
            if v.owner == owner and v.name == name:
                return v
        raise RequestFailed(ErrorCode.NOT_FOUND, f"volume {name!r} does not exist")

    def volume_by_key(self, key: str) -> VolumeRecord:
        for v in self.data.volumes:
            if v.key == key:
                return v
        raise RequestFailed(ErrorCode.NOT_FOUND, f"volume {key!r} does not exist")

    def volumes(self, owner: int | None = None) -> list[VolumeRecord]:
        return [v for v in self.data.volumes if owner is None or v.owner == owner]

    def add_volume(
        self, owner: int, name: str, origin: str, size_bytes: int, image: str = ""
    ) -> VolumeRecord:
        if any(v.owner == owner and v.name == name for v in self.data.volumes):
            raise RequestFailed(ErrorCode.ALREADY_EXISTS, f"volume {name!r} already exists")
        rec = VolumeRecord(
            key=self._new_key("v", {v.key for v in self.data.volumes}),
            owner=owner,
            name=name,
            created=time.time(),
            origin=origin,
            size_bytes=size_bytes,
            image=image,
        )
        self.data.volumes.append(rec)
        return rec

    def remove_volume(self, key: str) -> None:
        self.data.volumes = [v for v in self.data.volumes if v.key != key]

    # --- VMs ---------------------------------------------------------------------------

    def vm(self, owner: int, name: str) -> VmRecord:
        for m in self.data.vms:
            if m.owner == owner and m.name == name:
                return m
        raise RequestFailed(ErrorCode.NOT_FOUND, f"VM {name!r} does not exist")

    def vms(self, owner: int | None = None) -> list[VmRecord]:
        return [m for m in self.data.vms if owner is None or m.owner == owner]

    def vm_on_volume(self, volume_key: str) -> VmRecord | None:
        for m in self.data.vms:
            if m.volume_key == volume_key:
                return m
        return None

    def add_vm(
        self, owner: int, name: str, volume_key: str, vcpus: int, memory_mib: int
    ) -> VmRecord:
        if any(m.owner == owner and m.name == name for m in self.data.vms):
            raise RequestFailed(ErrorCode.ALREADY_EXISTS, f"VM {name!r} already exists")
        rec = VmRecord(
            key=self._new_key("m", {m.key for m in self.data.vms}),
            owner=owner,
            name=name,
            volume_key=volume_key,
            vcpus=vcpus,
            memory_mib=memory_mib,
            created=time.time(),
        )
        self.data.vms.append(rec)
        return rec

    def remove_vm(self, key: str) -> None:
        self.data.vms = [m for m in self.data.vms if m.key != key]

    # --- VMs a time limit ended ----------------------------------------------------------

    def ended_vm(self, owner: int, name: str) -> EndedVmRecord | None:
        return next((e for e in self.data.ended if e.owner == owner and e.name == name), None)

    def ended_vms(self, owner: int | None = None) -> list[EndedVmRecord]:
        return [e for e in self.data.ended if owner is None or e.owner == owner]

    def add_ended(self, rec: EndedVmRecord) -> None:
        """Keep ``rec``, replacing an older record of the same owner and name;
        an owner keeps at most :data:`MAX_ENDED_PER_OWNER` (oldest dropped)."""
        self.forget_ended(rec.owner, rec.name)
        self.data.ended.append(rec)
        mine = sorted(self.ended_vms(rec.owner), key=lambda e: e.at)
        drop = {id(e) for e in mine[: max(len(mine) - MAX_ENDED_PER_OWNER, 0)]}
        if drop:
            self.data.ended = [e for e in self.data.ended if id(e) not in drop]

    def forget_ended(self, owner: int, name: str) -> bool:
        """Drop the ended record of ``name``; whether there was one."""
        before = len(self.data.ended)
        self.data.ended = [
            e for e in self.data.ended if not (e.owner == owner and e.name == name)
        ]
        return len(self.data.ended) != before

    @staticmethod
    def _new_key(prefix: str, taken: set[str]) -> str:
        while True:
            key = prefix + secrets.token_hex(6)
            if key not in taken:
                return key
