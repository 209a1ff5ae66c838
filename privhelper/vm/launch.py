"""Starting QEMU: as an unprivileged uid, in its own session, with passed fds.

The child is set up by :mod:`subprocess` (``user``/``group``/
``extra_groups=[]`` do ``setgroups([])``, ``setgid``, ``setuid`` between fork
and exec, without a Python ``preexec_fn``), so QEMU never holds root, not even
for a moment, and its ``-sandbox elevateprivileges=deny`` has nothing to drop.
``start_new_session`` puts QEMU in its own session and process group and no
parent-death signal is set: QEMU outlives the helper (the unit uses
``KillMode=process``) and is adopted by the next one.

The helper opens every disk layer itself and passes the fds; QEMU opens only
the kernel and initrd (world-readable image files), the fw_cfg secret and its
sockets in its private run directory, which is owned by its uid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidVmSpec, LaunchError, UnprivilegedImpossible, VmUnavailable
from .spec import DiskLayer

#: The environment QEMU gets: nothing from the helper's.
QEMU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass
class OpenedDisks:
    """Disk layers rewritten to fds, and the fds we must close after the spawn."""

    layers: tuple[DiskLayer, ...]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def open_disk_layers(layers: tuple[DiskLayer, ...]) -> OpenedDisks:
    """Open each path layer (read-write for the top, read-only below) as the helper."""
    out = OpenedDisks(layers=())
    rewritten: list[DiskLayer] = []
    try:
        for i, layer in enumerate(layers):
            if layer.path is None:
                rewritten.append(layer)
                continue
            flags = os.O_RDONLY if layer.read_only else os.O_RDWR
            try:
                fd = os.open(layer.path, flags | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as e:
                raise InvalidVmSpec(
                    f"disk layer {i}: cannot open {layer.path}: {e.strerror}"
                ) from None
            out.fds.append(fd)
            rewritten.append(DiskLayer(format=layer.format, fd=fd, read_only=layer.read_only))
    except BaseException:
        out.close()
        raise
    out.layers = tuple(rewritten)
    return out


VHOST_VSOCK = "/dev/vhost-vsock"


def open_vhost_vsock() -> int:
    """Open /dev/vhost-vsock for a VM (QEMU gets the fd as ``vhostfd``)."""
    try:
        return os.open(VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmUnavailable(
            f"no {VHOST_VSOCK} on this host: use the virtio-serial guest channel"
        ) from None
    except OSError as e:
        raise VmUnavailable(f"cannot open {VHOST_VSOCK}: {e.strerror}") from None


def prepare_private_dir(path: Path, uid: int, gid: int) -> None:
    """(Re)create ``path`` empty, mode 0700, owned by ``uid:gid``."""
    shutil.rmtree(path, ignore_errors=True)  # never follows symlinks
    path.mkdir(mode=0o700, parents=False)
    os.chown(path, uid, gid)


def listen_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (0600) for QEMU to serve (``fd=`` chardev)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def secret_memfd(secret: bytes) -> int:
    """The secret in an anonymous memory file: QEMU reads it via /proc/self/fd/N,
    nothing is ever written to a disk or a directory."""
    fd = os.memfd_create("agentiso-secret", os.MFD_CLOEXEC)
    try:
        os.write(fd, secret)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LaunchResources:
    """Everything the helper opens for one QEMU start; closed on exit (QEMU has copies)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._socks: list[socket.socket] = []

    def __enter__(self) -> LaunchResources:
        return self

    def __exit__(self, *_exc: object) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        for sock in self._socks:
            sock.detach()  # its fd was closed with the others
        self._socks.clear()

    def open_disks(self, layers: tuple[DiskLayer, ...]) -> tuple[DiskLayer, ...]:
        opened = open_disk_layers(layers)
        self.fds += opened.fds
        return opened.layers

    def listen(self, path: str) -> int:
        sock = listen_unix(path)
        self._socks.append(sock)
        self.fds.append(sock.fileno())
        return sock.fileno()

    def secret(self, secret: bytes) -> int:
        fd = secret_memfd(secret)
        self.fds.append(fd)
        return fd

    def boot_file(self, path: str) -> str:
        """Open a kernel or initrd as the helper and give QEMU the path of its
        own copy of the fd (``/proc/self/fd/N``): QEMU reads it whatever the
        permissions of the directories it lives in."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidVmSpec(f"cannot open {path}: {e.strerror}") from None
        self.fds.append(fd)
        return f"/proc/self/fd/{fd}"

    def vhost_vsock(self) -> int:
        fd = open_vhost_vsock()
        self.fds.append(fd)
        return fd


def check_identity(uid: int, gid: int) -> None:
    """Refuse to start QEMU as root; refuse ids we cannot switch to."""
    if uid == 0 or gid == 0:
        raise UnprivilegedImpossible("refusing to run QEMU as root (uid or gid 0)")
    if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        raise UnprivilegedImpossible(
            f"the helper runs as uid {os.geteuid()}, not root: it cannot start QEMU as {uid}"
        )


ENGINE_TAG_VAR = "AGENTISO_ENGINE"


def spawn_qemu(
    argv: list[str],
    *,
    uid: int,
    gid: int,
    pass_fds: list[int],
    stderr_fd: int,
    cwd: Path,
    engine_tag: str = "",
) -> subprocess.Popen[bytes]:
    """Start QEMU as ``uid:gid`` with no supplementary groups, in a new session.

    ``engine_tag`` goes into QEMU's environment (``AGENTISO_ENGINE``) so the
    engine that started it can recognise it later, and another helper's
    engine can tell it is not its own."""
    check_identity(uid, gid)
    switch = os.geteuid() == 0
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr_fd,
            stderr=stderr_fd,
            pass_fds=pass_fds,
            close_fds=True,
            cwd=cwd,
            env={**QEMU_ENV, ENGINE_TAG_VAR: engine_tag} if engine_tag else QEMU_ENV,
            start_new_session=True,
            user=uid if switch else None,
            group=gid if switch else None,
            extra_groups=[] if switch else None,
            umask=0o077,
        )
    except PermissionError as e:
        raise UnprivilegedImpossible(
            f"cannot switch to uid {uid}/gid {gid} for QEMU ({e.strerror}); "
            "QEMU is never run as root instead"
        ) from None
    except OSError as e:
        raise LaunchError(f"cannot execute {argv[0]}: {e.strerror}") from None
    return proc
