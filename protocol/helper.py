"""Messages between the frontend (client) and the root helper (server).

Conversation::

    client connects
    helper checks SO_PEERCRED; if refused: Error(id=0, permission_denied), close
    client -> Hello(id, version)       helper -> HelloOk(id, ...) | Error(version_mismatch)
    then any number of requests, concurrently; each response carries its request's id.

Every struct forbids unknown fields and every field is bounded (see
:mod:`agentiso.protocol.types`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .codec import Codec
from .errors import ErrorCode
from .types import Label, Name, ProtocolVersion, RequestId, ShortText, Uid

#: Bump on any incompatible change to this module's messages.
HELPER_PROTOCOL_VERSION = 1

#: Largest frame either side accepts on the helper socket.
HELPER_MAX_FRAME = 4 * 1024 * 1024


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    id: RequestId


# --- requests (client -> helper) -----------------------------------------------------


class _Request(_Msg, kw_only=True):
    #: Root only: act on the resources of this uid instead of its own
    #: (administration); anyone else setting it is refused.
    owner: Uid | None = None


class Hello(_Request, tag="hello"):
    """First request of every connection."""

    version: ProtocolVersion
    client: Label = ""


class Ping(_Request, tag="ping"):
    pass


class WhoAmI(_Request, tag="whoami"):
    """Ask how the helper sees us (uid/gid/pid from SO_PEERCRED)."""


# --- bounded values of workspace requests ---------------------------------------------

MiB = 1024 * 1024
GiB = 1024 * MiB
#: A disk size in bytes: 64 MiB .. 16 TiB.
DiskBytes = Annotated[int, Meta(ge=64 * MiB, le=16 * 1024 * GiB)]
MemoryMiB = Annotated[int, Meta(ge=64, le=1024 * 1024)]
Vcpus = Annotated[int, Meta(ge=1, le=64)]
StopTimeout = Annotated[float, Meta(ge=0, le=600)]
ConsoleBytes = Annotated[int, Meta(ge=0, le=1024 * 1024)]
Count = Annotated[int, Meta(ge=0, le=2**62)]
ByteCount = Annotated[int, Meta(ge=0, le=2**62)]
Timestamp = Annotated[float, Meta(ge=0, le=2**40)]
#: Listings are paged so that no answer outgrows a frame: a listing request
#: starts at ``cursor`` (0 first), and an answer with ``next_cursor`` set is
#: one page of more.  A cursor is a position in the helper's current list,
#: so a listing that changes between pages may show an entry twice or miss
#: one made meanwhile (names are unique: keep the first of each).
Cursor = Annotated[int, Meta(ge=0, le=2**31)]
#: What one page of a listing may take, encoded: well under a frame.
LISTING_PAGE_BYTES = HELPER_MAX_FRAME // 4


class FromImage(msgspec.Struct, tag="image", forbid_unknown_fields=True):
    """A new volume copy-on-write from a guest image the helper knows."""

    image: Name


class FromSnapshot(msgspec.Struct, tag="snapshot", forbid_unknown_fields=True):
    """A new volume copy-on-write from a snapshot of one of the caller's volumes."""

    volume: Name
    snapshot: Name


VolumeSource = FromImage | FromSnapshot


class VolumeCreate(_Request, tag="volume_create"):
    name: Name
    source: VolumeSource
    #: Grow beyond the source's size (bytes); None keeps the source's size.
    size_bytes: DiskBytes | None = None


class VolumeDestroy(_Request, tag="volume_destroy"):
    name: Name


class VolumeGet(_Request, tag="volume_get"):
    name: Name


class VolumeList(_Request, tag="volume_list"):
    #: Where this page starts: 0, then the previous answer's ``next_cursor``.
    cursor: Cursor = 0


class VolumeGrow(_Request, tag="volume_grow"):
    name: Name
    size_bytes: DiskBytes


class SnapshotCreate(_Request, tag="snapshot_create"):
    """Snapshot a volume.  If a VM runs on it, the guest syncs and freezes
    first; with ``memory`` the VM's memory state is saved beside it too."""

    volume: Name
    snapshot: Name
    memory: bool = False


class SnapshotRollback(_Request, tag="snapshot_rollback"):
    """Return a volume (not in use by a running VM) to a snapshot; later
    snapshots are discarded."""

    volume: Name
    snapshot: Name


class SnapshotDelete(_Request, tag="snapshot_delete"):
    volume: Name
    snapshot: Name


class ImageList(_Request, tag="image_list"):
    pass


Port = Annotated[int, Meta(ge=1, le=65535)]
#: An IPv4 or IPv6 network in CIDR notation (checked fully by the helper).
Cidr = Annotated[
    str, Meta(min_length=2, max_length=43, pattern=r"\A[0-9a-fA-F.:]+(/[0-9]{1,3})?\Z")
]


class PortRange(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """``[first, last]``, inclusive."""

    first: Port
    last: Port


class AllowRule(msgspec.Struct, forbid_unknown_fields=True):
    """Egress to ``cidr``; only on ``ports`` if any are given."""

    cidr: Cidr
    ports: Annotated[list[PortRange], Meta(max_length=32)] = []
    protocol: Literal["tcp", "udp", "any"] = "any"


class NetworkPolicy(msgspec.Struct, forbid_unknown_fields=True):
    """What a VM may do on the network.  The default: nothing but talk to
    the host's forwards; no internet, no other workspace.

    * ``egress``: reach other networks (NAT); with ``allow``, only those.
    * ``peers``: the caller's other VMs this one may talk to (both ways
      once both name each other, or one names the other: same owner).
    * ``groups``: VMs of the caller in a shared group may talk.
    * ``inbound_ports``: guest TCP ports the host itself may connect to.
    """

    egress: bool = False
    allow: Annotated[list[AllowRule], Meta(max_length=64)] = []
    peers: Annotated[list[Name], Meta(max_length=64)] = []
    groups: Annotated[list[Name], Meta(max_length=16)] = []
    inbound_ports: Annotated[list[Port], Meta(max_length=64)] = []


#: A time limit: 10 s .. 30 days.
LimitSeconds = Annotated[float, Meta(ge=10, le=30 * 24 * 3600)]
TimeLimitAction = Literal["stop", "destroy"]


class TimeLimits(msgspec.Struct, forbid_unknown_fields=True):
    """When the helper ends a VM by itself.  The helper holds them, so they
    fire with no client connected, and they survive a helper restart.

    * ``idle_s``: no client request through the VM's guest relay (exec,
      files, jobs...) and no helper request that uses the VM (``GuestOpen``,
      ``VmNetworkSet``, ``ForwardAdd``/``ForwardRemove``, ``SnapshotCreate``
      of its volume) for this long, and none in flight (a long exec keeps
      it in use).  Looking at a VM (``VmGet``, ``VmList``,
      ``VmConsole``) is not activity, and neither is a job running in the
      guest with no client traffic.  After a helper restart idle time counts
      from the restart.
    * ``lifetime_s``: this long after the VM started, whatever its traffic.
    * ``action``: ``stop`` (the volume is kept) or ``destroy`` (the VM's
      volume, with its snapshots, is destroyed too).

    Neither limit set means no limit.  A VM a limit ended stays visible
    (``VmGet``, ``VmList``) as state ``stopped`` with ``ended`` and a
    ``reason``, holding nothing (no QEMU, no address, no TAP), until its
    owner's next ``VmStop`` (which just forgets it) or a ``VmStart`` of the
    same name (which replaces it).
    """

    idle_s: LimitSeconds | None = None
    lifetime_s: LimitSeconds | None = None
    action: TimeLimitAction = "stop"


class VmStart(_Request, tag="vm_start"):
    """Boot VM ``name`` on volume ``volume``.  ``network`` None: no network
    interface at all.

    Instead of booting, a VM may resume a memory state saved by
    ``SnapshotCreate(memory=True)``, in one of two ways (at most one is given;
    both at once is ``invalid``):

    * ``resume_snapshot``: the memory of that snapshot *of ``volume`` itself*;
      the volume is rolled back to it and the VM keeps the identity it had
      (its old address, which must be free).
    * ``resume_from``: the memory of snapshot ``resume_from.snapshot`` of the
      caller's volume ``resume_from.volume``, resumed on ``volume``, which
      must have been created as a clone of exactly that snapshot
      (``VolumeCreate(source=FromSnapshot(...))``) and never run since, else
      ``conflict``.  The VM always takes a new identity: a fresh
      address from the pool and the MAC derived from it, hostname = ``name``,
      a new machine-id, fresh randomness, the clock stepped to now; its link
      stays down until the guest has taken it.  Any number of VMs may resume
      from one snapshot at once, next to the VM that saved it.

    A resumed VM's ``vcpus`` and ``memory_mib`` must be those of the VM that
    saved the memory (``conflict`` otherwise).
    """

    name: Name
    volume: Name
    vcpus: Vcpus = 1
    memory_mib: MemoryMiB = 256
    resume_snapshot: Name | None = None
    resume_from: FromSnapshot | None = None
    network: NetworkPolicy | None = msgspec.field(default_factory=NetworkPolicy)
    time_limits: TimeLimits | None = None


class VmNetworkSet(_Request, tag="vm_network_set"):
    """Replace a running VM's network policy (atomically)."""

    name: Name
    policy: NetworkPolicy


class ForwardAdd(_Request, tag="forward_add"):
    """Forward ``host_port`` (>= 1024, free on every address, IPv4 and IPv6,
    and redirected by no other nft rule) to ``guest_port`` of the VM.

    Connections the host makes to the port (127.0.0.1 or any host address) are
    forwarded for the VM's owner uid and root only.  ``external`` also forwards
    the port for traffic from other hosts, on every host address."""

    vm: Name
    host_port: Port
    guest_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    external: bool = False


class ForwardRemove(_Request, tag="forward_remove"):
    vm: Name
    host_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"


class VmStop(_Request, tag="vm_stop"):
    """Stop gracefully (guest shutdown, then ACPI), killing after ``timeout_s``;
    ``force`` kills at once."""

    name: Name
    timeout_s: StopTimeout = 30.0
    force: bool = False


class VmGet(_Request, tag="vm_get"):
    name: Name


class VmList(_Request, tag="vm_list"):
    #: Where this page starts: 0, then the previous answer's ``next_cursor``.
    cursor: Cursor = 0


class VmConsole(_Request, tag="vm_console"):
    name: Name
    max_bytes: ConsoleBytes = 64 * 1024


class GuestOpen(_Request, tag="guest_open"):
    """Turn this connection into a channel to VM ``vm``'s guest agent.

    After ``GuestOpened`` every frame on the connection, both ways, is a guest
    protocol message (agentiso.protocol.guest); the helper relays them,
    sharing the VM's one channel among all its clients.
    """

    vm: Name


class AdminList(_Request, tag="admin_list"):
    """Admin only: every volume and VM of every user (paged: see ``Cursor``)."""

    cursor: Cursor = 0


class Gc(_Request, tag="gc"):
    """Admin only: find (and unless ``dry_run``, remove) resources that no
    registry entry owns."""

    dry_run: bool = True


HelperRequest = (
    Hello
    | Ping
    | WhoAmI
    | ImageList
    | VolumeCreate
    | VolumeDestroy
    | VolumeGet
    | VolumeList
    | VolumeGrow
    | SnapshotCreate
    | SnapshotRollback
    | SnapshotDelete
    | VmStart
    | VmStop
    | VmGet
    | VmList
    | VmConsole
    | VmNetworkSet
    | ForwardAdd
    | ForwardRemove
    | GuestOpen
    | AdminList
    | Gc
)


# --- responses (helper -> client) ----------------------------------------------------


class HelloOk(_Msg, tag="hello_ok"):
    version: ProtocolVersion
    server: Label
    uptime_s: float


class Pong(_Msg, tag="pong"):
    pass


class Identity(_Msg, tag="identity"):
    uid: Uid
    gid: Uid
    pid: Uid
    admin: bool


class Error(_Msg, tag="error"):
    """A typed failure of request ``id`` (0: of the connection as a whole)."""

    code: ErrorCode
    message: ShortText


class ImageInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    size_bytes: ByteCount
    description: Label = ""


class Images(_Msg, tag="images"):
    images: Annotated[list[ImageInfo], Meta(max_length=1024)]


class SnapshotInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    created: Timestamp
    used_bytes: ByteCount
    #: A memory state was saved with it (the VM can be resumed from it).
    memory: bool = False


class VolumeInfo(_Msg, tag="volume"):
    name: Name
    size_bytes: ByteCount
    used_bytes: ByteCount
    created: Timestamp
    #: What it was created from: "image:<name>" or "snapshot:<volume>@<snapshot>".
    origin: Label
    snapshots: Annotated[list[SnapshotInfo], Meta(max_length=4096)] = []
    #: The VM currently running on it, if any.
    vm: Name | None = None


class Volumes(_Msg, tag="volumes"):
    volumes: Annotated[list[VolumeInfo], Meta(max_length=65536)]
    #: Set when the listing goes on: ask again with ``cursor=next_cursor``.
    next_cursor: Cursor | None = None


VmState = Literal["starting", "running", "stopping", "stopped", "crashed"]


class ForwardInfo(msgspec.Struct, forbid_unknown_fields=True):
    host_port: Port
    guest_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"


class VmNetworkInfo(msgspec.Struct, forbid_unknown_fields=True):
    address: Label
    prefix: Annotated[int, Meta(ge=0, le=128)]
    gateway: Label
    mac: Label
    policy: NetworkPolicy
    forwards: Annotated[list[ForwardInfo], Meta(max_length=64)] = []


class VmEnded(msgspec.Struct, forbid_unknown_fields=True):
    """How a time limit ended a VM (see :class:`TimeLimits`)."""

    #: Which limit fired.
    limit: Literal["idle", "lifetime"]
    #: When (seconds since the epoch).
    at: Timestamp
    #: ``stop``: the volume is kept; ``destroy``: the volume is gone too.
    action: TimeLimitAction


class VmInfo(_Msg, tag="vm"):
    name: Name
    volume: Name
    state: VmState
    vcpus: Vcpus
    memory_mib: MemoryMiB
    created: Timestamp
    #: Accelerator in use: "kvm" or "tcg".
    accel: Label = ""
    #: Why it stopped: with the tail of its console when it crashed; the
    #: limit (e.g. "idle for 600 s (time limit)") when a time limit ended it.
    reason: ShortText = ""
    network: VmNetworkInfo | None = None
    #: The limits it was started with.
    time_limits: TimeLimits | None = None
    #: Running VM with limits: when the first of them fires if nothing
    #: happens from now on (seconds since the epoch).
    expires_at: Timestamp | None = None
    #: Set when a time limit ended it (state ``stopped``, no QEMU, no
    #: address, no network: all released).
    ended: VmEnded | None = None


class Vms(_Msg, tag="vms"):
    vms: Annotated[list[VmInfo], Meta(max_length=65536)]
    next_cursor: Cursor | None = None


class ConsoleText(_Msg, tag="console"):
    text: Annotated[str, Meta(max_length=4 * 1024 * 1024)]


class GuestOpened(_Msg, tag="guest_opened"):
    vm: Name


class GcReport(_Msg, tag="gc_report"):
    dry_run: bool
    #: Human-readable descriptions of what was found (and removed).
    orphans: Annotated[list[ShortText], Meta(max_length=65536)]


class AdminVolume(msgspec.Struct, forbid_unknown_fields=True):
    owner: Uid
    name: Name
    key: Name
    size_bytes: ByteCount
    snapshots: Annotated[list[Name], Meta(max_length=4096)]
    vm: Name | None = None


class AdminVm(msgspec.Struct, forbid_unknown_fields=True):
    owner: Uid
    name: Name
    key: Name
    volume: Name
    state: Label
    vcpus: Vcpus
    memory_mib: MemoryMiB
    pid: Annotated[int, Meta(ge=0, le=2**32)] = 0
    qemu_uid: Annotated[int, Meta(ge=0, le=2**32)] = 0


class AdminListing(_Msg, tag="admin_listing"):
    volumes: Annotated[list[AdminVolume], Meta(max_length=1 << 20)]
    vms: Annotated[list[AdminVm], Meta(max_length=1 << 20)]
    next_cursor: Cursor | None = None


class Done(_Msg, tag="done"):
    """Success of a request that returns nothing else."""


HelperResponse = (
    HelloOk
    | Pong
    | Identity
    | Error
    | Images
    | VolumeInfo
    | Volumes
    | VmInfo
    | Vms
    | ConsoleText
    | GuestOpened
    | GcReport
    | AdminListing
    | Done
)

request_codec: Codec[HelperRequest] = Codec(HelperRequest)
response_codec: Codec[HelperResponse] = Codec(HelperResponse)
