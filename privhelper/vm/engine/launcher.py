"""Spawning one VM's QEMU: the resolved spec, its private directories, the fds
it gets, and the record that lets a later helper adopt it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agentiso.protocol.guest_constants import SECRET_MAX_BYTES, SECRET_MIN_BYTES

from ...vsock import set_guest_cid
from ..accel import AccelDecision
from ..cmdline import build_argv
from ..errors import InvalidVmSpec, VmUnavailable
from ..launch import LaunchResources, prepare_private_dir, spawn_qemu
from ..procfs import read_stat
from ..record import VmRecord
from ..spec import Accel, Incoming, MemoryFile, VirtioSerialChannel, VmSpec, VsockChannel
from .types import EngineSettings, VmConfig


@dataclass(frozen=True)
class Placement:
    """Where and as whom one VM's QEMU runs."""

    run: Path
    logs: Path
    uid: int
    gid: int
    accel: AccelDecision
    #: The host TSC rate for the guest kernel under TCG (None: unknown).
    tsc_khz: int | None
    #: Marks the QEMUs of one engine (its environment), for the orphan scan.
    engine_tag: str


def resolve_spec(cfg: VmConfig, settings: EngineSettings, where: Placement) -> VmSpec:
    """The full spec of ``cfg`` (paths only: what is recorded), validated."""
    run = where.run
    if len(str(run / "console.sock").encode()) > 107:
        raise InvalidVmSpec(f"run_dir {run.parent} is too long for Unix socket paths")
    if cfg.channel == "virtio-serial":
        channel: VirtioSerialChannel | VsockChannel = VirtioSerialChannel(
            socket_path=str(run / "agent.sock")
        )
    else:
        if cfg.guest_cid is None:
            raise InvalidVmSpec("a vsock channel needs a guest CID")
        if cfg.secret is None:
            # Any local process may connect to a guest over vsock: the agent
            # only answers whoever presents the per-VM secret.
            raise InvalidVmSpec("a vsock channel needs a per-VM secret")
        channel = VsockChannel(guest_cid=cfg.guest_cid, vhost_fd=cfg.vhost_vsock_fd)
    if cfg.secret is not None and not SECRET_MIN_BYTES <= len(cfg.secret) <= SECRET_MAX_BYTES:
        # The agent refuses a secret outside these bounds.
        raise InvalidVmSpec(
            f"the secret must be {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes"
        )
    kind = where.accel.kind
    spec = VmSpec(
        name=cfg.name,
        kernel=cfg.kernel,
        initrd=cfg.initrd,
        cmdline=cfg.cmdline,
        disks=cfg.disks,
        vcpus=cfg.vcpus,
        memory_mib=cfg.memory_mib,
        channel=channel,
        qmp_socket=str(run / "qmp.sock"),
        console_socket=str(run / "console.sock"),
        accel=Accel(kind=kind, tb_size_mib=settings.tb_size_mib),
        net=cfg.net,
        # The saved state comes later, over QMP (migrate-incoming), once the
        # engine listens for QEMU's migration events.
        incoming=None if cfg.incoming_fd is None else Incoming(),
        memory_file=(None if cfg.memory_fd is None
                     else MemoryFile(fd=cfg.memory_fd, share=cfg.memory_shared)),
        tsc_khz=where.tsc_khz if kind == "tcg" else None,
        start_paused=True,
    )
    build_argv(spec)  # validate before opening anything
    return spec


def spawn(
    cfg: VmConfig, settings: EngineSettings, where: Placement
) -> tuple[subprocess.Popen[bytes], VmRecord]:
    """Start QEMU (paused, ``-S``) for ``cfg`` and return it with its record.

    The caller's fds (TAP, vhost) are passed and stay the caller's.  A failure
    leaves no run directory or logs behind.
    """
    run, logs = where.run, where.logs
    try:
        # Root-only: the sockets here are made and bound by the helper and
        # handed to QEMU as listening fds, so an unprivileged QEMU can never
        # swap one for a symlink to someone else's socket.
        prepare_private_dir(run, os.getuid(), os.getgid())
        logs.mkdir(mode=0o700, exist_ok=True)
        for old_log in logs.iterdir():
            old_log.unlink()
        spec = resolve_spec(cfg, settings, where)
        stderr_path = logs / "stderr.log"
        with LaunchResources() as res:
            launch = msgspec.structs.replace(
                spec,
                kernel=res.boot_file(cfg.kernel),
                initrd=None if cfg.initrd is None else res.boot_file(cfg.initrd),
                disks=res.open_disks(cfg.disks),
                qmp_fd=res.listen(spec.qmp_socket),
                console_fd=res.listen(spec.console_socket),
                fw_cfg_secret_fd=None if cfg.secret is None else res.secret(cfg.secret),
            )
            channel = spec.channel
            if isinstance(channel, VsockChannel):
                vfd = channel.vhost_fd
                if vfd is None:
                    # QEMU (unprivileged) cannot open the device: the helper does.
                    vfd = res.vhost_vsock()
                # Claimed on the VM's own device fd before QEMU runs (which then
                # sets the same CID again, harmlessly): a CID another hypervisor
                # took since it was picked is a clear error, not a QEMU crash.
                if not set_guest_cid(vfd, channel.guest_cid):
                    raise VmUnavailable(
                        f"vsock guest CID {channel.guest_cid} was taken by another VM on "
                        "the host meanwhile; start this VM again (it gets another CID)"
                    )
                launch_channel: VirtioSerialChannel | VsockChannel = msgspec.structs.replace(
                    channel, vhost_fd=vfd
                )
            else:
                launch_channel = msgspec.structs.replace(
                    channel, listen_fd=res.listen(channel.socket_path)
                )
            launch = msgspec.structs.replace(launch, channel=launch_channel)
            argv = build_argv(launch, settings.qemu_binary)
            pass_fds = [*res.fds]
            for fd in (
                cfg.net.tap_fd if cfg.net else None,
                cfg.vhost_vsock_fd if cfg.channel == "vsock" else None,
                cfg.memory_fd,
            ):
                if fd is not None:
                    pass_fds.append(fd)
            stderr_fd = os.open(
                stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            try:
                popen = spawn_qemu(
                    argv,
                    uid=where.uid,
                    gid=where.gid,
                    pass_fds=pass_fds,
                    stderr_fd=stderr_fd,
                    cwd=Path("/"),
                    engine_tag=where.engine_tag,
                )
            finally:
                os.close(stderr_fd)
    except BaseException:
        # Nothing of a VM that never ran is left behind.
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        raise
    st = read_stat(popen.pid)
    record = VmRecord(
        name=cfg.name,
        pid=popen.pid,
        pid_start_time=st.start_time if st else 0,
        uid=where.uid,
        gid=where.gid,
        run_dir=str(run),
        qmp_socket=spec.qmp_socket,
        console_socket=spec.console_socket,
        channel_socket=channel.socket_path if isinstance(channel, VirtioSerialChannel) else None,
        console_log=str(logs / "console.log"),
        stderr_log=str(stderr_path),
        spec=spec,
        started_at=time.time(),
    )
    return popen, record
