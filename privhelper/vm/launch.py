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

import os
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
    if path.exists():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    path.mkdir(mode=0o700, parents=False)
    os.chown(path, uid, gid)


def write_owned_file(path: Path, data: bytes, uid: int, gid: int, mode: int = 0o400) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def check_identity(uid: int, gid: int) -> None:
    """Refuse to start QEMU as root; refuse ids we cannot switch to."""
    if uid == 0 or gid == 0:
        raise UnprivilegedImpossible("refusing to run QEMU as root (uid or gid 0)")
    if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        raise UnprivilegedImpossible(
            f"the helper runs as uid {os.geteuid()}, not root: it cannot start QEMU as {uid}"
        )


def spawn_qemu(
    argv: list[str],
    *,
    uid: int,
    gid: int,
    pass_fds: list[int],
    stderr_fd: int,
    cwd: Path,
) -> subprocess.Popen[bytes]:
    """Start QEMU as ``uid:gid`` with no supplementary groups, in a new session."""
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
            env=QEMU_ENV,
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
