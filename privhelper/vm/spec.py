"""The typed description of one QEMU microVM instance, and its validation.

A :class:`VmSpec` is fully resolved: every path, socket and file descriptor
QEMU will see is in it, so :func:`agentiso.privhelper.vm.cmdline.build_argv`
can turn it into an argv without touching the system.  Specs are built by the
engine (from the caller's :class:`VmConfig`), not decoded from a client, so the
``Meta`` bounds are not enough: :func:`validate_spec` checks everything and
raises :class:`~.errors.InvalidVmSpec` with the first problem found.

File descriptors in a spec are numbers *as QEMU will see them*; the launcher
passes them with ``pass_fds`` so they keep their numbers in the child.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from agentiso.protocol.types import NAME_PATTERN

from .errors import InvalidVmSpec

MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1024 * 1024
MIN_TB_SIZE_MIB = 1
MAX_TB_SIZE_MIB = 4096
MAX_DISK_LAYERS = 64
#: Linux x86 COMMAND_LINE_SIZE.
MAX_CMDLINE = 2048
MAX_PATH = 4096
#: sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
MIN_FD = 3
MAX_FD = 65535
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE

_NAME_RE = re.compile(NAME_PATTERN)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Printable ASCII only: the kernel command line is parsed by the guest kernel
# and shown in logs; nothing else has a reason to be there.
_CMDLINE_RE = re.compile(r"^[\x20-\x7e]*$")

DiskFormat = Literal["qcow2", "raw"]
AccelKind = Literal["kvm", "tcg"]


class DiskLayer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One image of the root disk's chain: a path QEMU must open, or an open fd.

    ``path`` is what the engine resolves; the launcher opens it (as root) and
    replaces it by ``fd`` so QEMU never opens a disk path itself.
    """

    format: DiskFormat
    path: str | None = None
    fd: int | None = None
    read_only: bool = False


class VirtioSerialChannel(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag="virtio-serial",
    tag_field="kind",
):
    """Guest channel over a virtserialport, QEMU serving a Unix socket.

    ``socket_path`` is where the helper connects.  With ``listen_fd`` QEMU
    serves that already-listening socket (made by the helper at
    ``socket_path``); without it QEMU creates the socket itself.
    """

    socket_path: str
    listen_fd: int | None = None


class VsockChannel(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="vsock", tag_field="kind"
):
    """Guest channel over AF_VSOCK; ``vhost_fd`` is /dev/vhost-vsock opened by the helper."""

    guest_cid: int
    vhost_fd: int | None = None


GuestChannel = VirtioSerialChannel | VsockChannel


class NetAttachment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A TAP device opened by the helper (fd) and the guest NIC's MAC address."""

    tap_fd: int
    mac: str


class Accel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``kvm``, or ``tcg`` with a bounded translation-block cache of ``tb_size_mib``."""

    kind: AccelKind = "tcg"
    tb_size_mib: int = 64


class MemoryFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Guest RAM in a file the helper opened (``fd``, e.g. a memfd), which QEMU
    maps through ``/proc/self/fd``: ``share=True`` writes the guest's RAM into
    the file (a template VM); ``share=False`` maps it private copy-on-write (a
    clone: unchanged pages stay shared through the page cache, writes are its own)."""

    fd: int
    share: bool = False


class Incoming(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Start from a saved memory image: read from ``fd``, or ``None`` for ``defer``."""

    fd: int | None = None


class VmSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything QEMU needs for one VM.  ``disks`` is the root disk chain, top first."""

    name: str
    kernel: str
    cmdline: str
    disks: tuple[DiskLayer, ...]
    channel: GuestChannel
    #: Where the helper connects; see VirtioSerialChannel for the ``*_fd`` twins.
    qmp_socket: str
    console_socket: str
    qmp_fd: int | None = None
    console_fd: int | None = None
    initrd: str | None = None
    vcpus: int = 1
    memory_mib: int = 256
    accel: Accel = msgspec.field(default_factory=Accel)
    net: NetAttachment | None = None
    fw_cfg_secret_file: str | None = None
    #: The secret as an fd (e.g. a memfd) QEMU reads via /proc/self/fd: no file
    #: for anyone to find.  Exclusive with ``fw_cfg_secret_file``.
    fw_cfg_secret_fd: int | None = None
    incoming: Incoming | None = None
    #: Guest RAM in a file instead of anonymous memory (boot templates).
    memory_file: MemoryFile | None = None
    #: Under TCG the guest's TSC runs at the host's TSC rate; telling the kernel
    #: (``tsc_early_khz``) spares it a PIT calibration that fails when the host
    #: is loaded, after which a stock kernel hangs with no clocksource.
    tsc_khz: int | None = None
    #: Start with the CPUs stopped (``-S``); the engine connects QMP and the
    #: console first, then resumes, so no early output is lost.
    start_paused: bool = True


# --- validation --------------------------------------------------------------------


def _fail(message: str) -> InvalidVmSpec:
    return InvalidVmSpec(message)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _fail(f"VM name {name!r} must match {NAME_PATTERN}")


def check_path(what: str, path: str, *, limit: int = MAX_PATH) -> None:
    """An absolute path without NUL or line breaks, at most ``limit`` bytes."""
    if not isinstance(path, str) or not path:
        raise _fail(f"{what}: path must be a non-empty string")
    if "\0" in path or "\n" in path or "\r" in path:
        raise _fail(f"{what}: path contains NUL or a line break")
    if not path.startswith("/"):
        raise _fail(f"{what}: path {path!r} is not absolute")
    if len(path.encode()) > limit:
        raise _fail(f"{what}: path is longer than {limit} bytes")
    if any(part == ".." for part in path.split("/")):
        raise _fail(f"{what}: path {path!r} contains '..'")


def check_fd(what: str, fd: int) -> None:
    if isinstance(fd, bool) or not isinstance(fd, int) or not MIN_FD <= fd <= MAX_FD:
        raise _fail(f"{what}: fd {fd!r} must be an int in [{MIN_FD}, {MAX_FD}]")


def _check_int(what: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(f"{what} {value!r} must be an int in [{lo}, {hi}]")


def check_mac(mac: str) -> None:
    """A lowercase colon-separated unicast MAC, not all zeros."""
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise _fail(f"MAC {mac!r} must look like 52:54:00:12:34:56 (lowercase)")
    first = int(mac[:2], 16)
    if first & 1:
        raise _fail(f"MAC {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise _fail("MAC must not be all zeros")


def check_cmdline(cmdline: str) -> None:
    if not isinstance(cmdline, str) or not _CMDLINE_RE.fullmatch(cmdline):
        raise _fail("kernel command line must be printable ASCII")
    if len(cmdline) >= MAX_CMDLINE:
        raise _fail(f"kernel command line must be shorter than {MAX_CMDLINE} bytes")


def _check_disks(disks: tuple[DiskLayer, ...]) -> list[int]:
    if not disks:
        raise _fail("the root disk needs at least one layer")
    if len(disks) > MAX_DISK_LAYERS:
        raise _fail(f"the root disk chain has more than {MAX_DISK_LAYERS} layers")
    fds: list[int] = []
    for i, layer in enumerate(disks):
        what = f"disk layer {i}"
        if layer.format not in ("qcow2", "raw"):
            raise _fail(f"{what}: format {layer.format!r} is not qcow2 or raw")
        if (layer.path is None) == (layer.fd is None):
            raise _fail(f"{what}: exactly one of path and fd must be given")
        if layer.path is not None:
            check_path(what, layer.path)
        if layer.fd is not None:
            check_fd(what, layer.fd)
            fds.append(layer.fd)
        if i > 0 and not layer.read_only:
            raise _fail(f"{what}: backing layers must be read-only")
        if i < len(disks) - 1 and layer.format != "qcow2":
            raise _fail(f"{what}: only a qcow2 layer can have a backing layer")
    return fds


def validate_spec(spec: VmSpec) -> None:
    """Raise :class:`InvalidVmSpec` unless every field of ``spec`` is in bounds."""
    check_name(spec.name)
    check_path("kernel", spec.kernel)
    if spec.initrd is not None:
        check_path("initrd", spec.initrd)
    check_cmdline(spec.cmdline)
    _check_int("vcpus", spec.vcpus, 1, MAX_VCPUS)
    _check_int("memory_mib", spec.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    if spec.accel.kind not in ("kvm", "tcg"):
        raise _fail(f"accelerator {spec.accel.kind!r} is not kvm or tcg")
    _check_int("tb_size_mib", spec.accel.tb_size_mib, MIN_TB_SIZE_MIB, MAX_TB_SIZE_MIB)
    if spec.tsc_khz is not None:
        _check_int("tsc_khz", spec.tsc_khz, 1000, 100_000_000)
    fds = _check_disks(spec.disks)
    check_path("qmp socket", spec.qmp_socket, limit=MAX_SOCKET_PATH)
    check_path("console socket", spec.console_socket, limit=MAX_SOCKET_PATH)
    sockets = [spec.qmp_socket, spec.console_socket]
    for what, sfd in (("qmp listen", spec.qmp_fd), ("console listen", spec.console_fd)):
        if sfd is not None:
            check_fd(what, sfd)
            fds.append(sfd)
    match spec.channel:
        case VirtioSerialChannel(socket_path=path, listen_fd=lfd):
            check_path("guest channel socket", path, limit=MAX_SOCKET_PATH)
            sockets.append(path)
            if lfd is not None:
                check_fd("guest channel listen", lfd)
                fds.append(lfd)
        case VsockChannel(guest_cid=cid, vhost_fd=vfd):
            _check_int("guest CID", cid, MIN_GUEST_CID, MAX_GUEST_CID)
            if vfd is not None:
                check_fd("vhost-vsock", vfd)
                fds.append(vfd)
        case _:
            raise _fail(f"unknown guest channel {spec.channel!r}")
    if len(set(sockets)) != len(sockets):
        raise _fail("QMP, console and channel sockets must be distinct paths")
    if spec.net is not None:
        check_fd("TAP", spec.net.tap_fd)
        fds.append(spec.net.tap_fd)
        check_mac(spec.net.mac)
    if spec.fw_cfg_secret_file is not None:
        check_path("fw_cfg secret file", spec.fw_cfg_secret_file)
        if spec.fw_cfg_secret_fd is not None:
            raise _fail("give the fw_cfg secret as a file or as an fd, not both")
    if spec.fw_cfg_secret_fd is not None:
        check_fd("fw_cfg secret", spec.fw_cfg_secret_fd)
        fds.append(spec.fw_cfg_secret_fd)
    if spec.incoming is not None and spec.incoming.fd is not None:
        check_fd("incoming migration", spec.incoming.fd)
        fds.append(spec.incoming.fd)
    if spec.memory_file is not None:
        check_fd("memory file", spec.memory_file.fd)
        fds.append(spec.memory_file.fd)
    if len(set(fds)) != len(fds):
        raise _fail("the same fd number is used twice")
