"""The VM engine's types: settings, what a caller asks for, what it gets back,
and the VM state machine (states and the transitions allowed between them)."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from ..spec import DiskLayer, NetAttachment

MIB = 1024 * 1024


class EngineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Configuration of the engine (a ``[vm]`` table in the helper's config)."""

    #: Records and logs live under ``<state_dir>/vm``.
    state_dir: str
    #: Per-VM private directories with QEMU's sockets.  Keep it short: a Unix
    #: socket path has at most 107 bytes.  Must be traversable by other uids.
    run_dir: str = "/run/agentiso/vm"
    qemu_binary: str = "qemu-system-x86_64"
    #: Each QEMU runs as its own uid (and same-numbered gid) from this range.
    uid_base: int = 3_000_000
    uid_count: int = 4096
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: TCG translation cache per VM (QEMU's default is 1 GiB).
    tb_size_mib: int = 64
    console_max_bytes: int = 1 * MIB
    stderr_max_bytes: int = 256 * 1024
    console_tail_bytes: int = 4096
    qmp_timeout_s: float = 10.0
    start_timeout_s: float = 30.0
    incoming_timeout_s: float = 300.0
    probe_timeout_s: float = 5.0
    #: Put each QEMU in cgroups limiting its CPU (its vCPUs' worth), memory
    #: (guest RAM + translation cache + ``cgroup_overhead_mib``) and tasks,
    #: where the host has cgroup v1 controllers (see cgroups.py).
    cgroup_limits: bool = True
    #: Memory a VM's QEMU may use beyond guest RAM and translation cache
    #: (device state, I/O buffers, the QEMU binary itself), in MiB.
    cgroup_overhead_mib: int = 256
    #: Most tasks (threads and processes) one VM's QEMU may have.
    cgroup_pids_max: int = 512


class VmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a caller asks for; the engine adds sockets, uid, accelerator, fds."""

    name: str
    kernel: str
    cmdline: str
    #: Root disk chain, top (writable) layer first; paths are opened by the helper.
    disks: tuple[DiskLayer, ...]
    initrd: str | None = None
    vcpus: int = 1
    memory_mib: int = 256
    channel: Literal["virtio-serial", "vsock"] = "virtio-serial"
    guest_cid: int | None = None
    #: /dev/vhost-vsock opened by the caller (vsock only); stays the caller's.
    vhost_vsock_fd: int | None = None
    #: TAP fd opened by the caller; stays the caller's (the engine never closes it).
    net: NetAttachment | None = None
    #: Per-VM secret handed to the guest through fw_cfg.
    secret: bytes | None = None
    #: Readable fd of a memory image written by ``VmEngine.save_memory``;
    #: stays the caller's.
    incoming_fd: int | None = None
    #: Run with the NIC's link down (set before the first ``cont``, after a
    #: restored state, whose own link state would otherwise win) until
    #: ``VmEngine.set_link(name, True)``: a guest resumed from another VM's
    #: memory must not reach the network under that VM's identity.
    net_link_down: bool = False
    #: Guest RAM in this file (an fd opened by the caller; stays the
    #: caller's) instead of anonymous memory: see ``spec.MemoryFile``.
    memory_fd: int | None = None
    #: With ``memory_fd``: the guest writes its RAM into the file (a template
    #: VM) rather than into private copy-on-write pages (a clone).  A saved
    #: state of a shared-RAM VM leaves the RAM out (``x-ignore-shared``), and a
    #: VM resuming with a ``memory_fd`` expects such a state.
    memory_shared: bool = False


class VmState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


FINISHED = (VmState.STOPPED, VmState.CRASHED)

#: Every transition a VM may make (the model is qemu.qmp's ``Runstate``: one
#: place changes the state, and only along these edges).  STOPPED and CRASHED
#: are final; a QEMU may end (STOPPED/CRASHED) from any other state.
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.STARTING: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.STOPPING, *FINISHED}
    ),
    VmState.RUNNING: frozenset({VmState.PAUSED, VmState.STOPPING, *FINISHED}),
    VmState.PAUSED: frozenset({VmState.RUNNING, VmState.STOPPING, *FINISHED}),
    VmState.STOPPING: frozenset(FINISHED),
    VmState.STOPPED: frozenset(),
    VmState.CRASHED: frozenset(),
}


def may_transition(old: VmState, new: VmState) -> bool:
    """Whether a VM in ``old`` may go to ``new`` (staying put is always allowed)."""
    return old == new or new in TRANSITIONS[old]


@dataclass(frozen=True)
class VmStatus:
    name: str
    state: VmState
    pid: int
    uid: int
    started_at: float
    adopted: bool
    channel_socket: str | None
    #: How it ended (``exit 0``, ``signal 9``, ``stopped by powerdown``...).
    exit_reason: str | None = None
    #: Last bytes of the serial console, for a VM that has ended.
    console_tail: str | None = None
    #: Why QEMU paused it on a disk error (a full host filesystem, say); None
    #: while it runs, and once it is resumed.
    io_error: str | None = None


def io_error_reason(data: object) -> str | None:
    """What a QMP ``BLOCK_IO_ERROR`` event means for the VM's owner, or None
    when QEMU did not pause the VM for it (``action`` other than ``stop``).

    The root disk's ``werror`` is QEMU's default, ``enospc``: a write that
    finds the host filesystem full pauses the VM (nothing is lost, it can go
    on once there is room) instead of failing the write in the guest.
    """
    if not isinstance(data, dict) or data.get("action") != "stop":
        return None
    if data.get("nospace"):
        return "no space left on the host's storage for a write to its disk"
    operation = str(data.get("operation", "an access"))
    reason = str(data.get("reason", "") or "unknown error")
    return f"a host I/O error on {operation} of its disk ({reason[:200]})"


@dataclass(frozen=True)
class VmEvent:
    """Published when a VM ends; ``state`` is STOPPED or CRASHED."""

    name: str
    state: VmState
    exit_reason: str
    console_tail: str


@dataclass(frozen=True)
class AdoptReport:
    adopted: list[str]
    dead: list[VmStatus]
    unreadable: dict[str, str]


@dataclass(frozen=True)
class Orphan:
    pid: int
    name: str
    uid: int


@dataclass(frozen=True)
class MemorySaveResult:
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


AgentShutdown = Callable[[], Awaitable[None]]
