"""Starting, watching and stopping one test VM (the I/O half of the harness)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from images.hosttsc import tsc_khz_from_cpuinfo, with_tsc_khz

from .images import ImageInfo, missing_reason
from .qemu import QemuConfig, qemu_argv


class HarnessError(Exception):
    """The harness could not boot, reach or stop a VM (root of the harness's errors)."""


class BootedVM:
    """A running QEMU started by :func:`boot_vm`.  A context manager: leaving stops it.

    Files, all in the workdir given to :func:`boot_vm`: ``disk.qcow2`` (overlay on the
    image's rootfs.img), ``agent.sock`` (the agent channel, a listening Unix socket
    QEMU owns), ``console.log`` (ttyS0) and ``qemu.stderr``.
    """

    def __init__(self, process: subprocess.Popen[bytes], workdir: Path, started: float) -> None:
        self.process = process
        self.workdir = workdir
        #: time.monotonic() just before QEMU was spawned.
        self.started = started
        self.disk_path = workdir / "disk.qcow2"
        self.channel_path = workdir / "agent.sock"
        self.console_path = workdir / "console.log"
        self.stderr_path = workdir / "qemu.stderr"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def console_text(self) -> str:
        """Everything the guest has written to its serial console so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_console(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Poll the console until regex ``pattern`` matches; return the match.

        Raises :class:`HarnessError` with the console tail on timeout or if QEMU exits.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console_text())
            if match:
                return match
            if not self.alive():
                raise HarnessError(
                    f"QEMU exited ({self.process.returncode}) before {pattern!r} appeared"
                    f"\n--- console tail ---\n{self.tail()}\n--- stderr ---\n{self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{pattern!r} not on the console after {timeout} s\n--- tail ---\n{self.tail()}"
                )
            time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def connect_channel(self, timeout: float = 10.0) -> socket.socket:
        """A connected blocking socket to the agent channel (QEMU accepts one client)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.channel_path))
                return sock
            except OSError as exc:
                sock.close()
                if not self.alive() or time.monotonic() > deadline:
                    raise HarnessError(f"cannot connect to {self.channel_path}: {exc}") from exc
                time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill QEMU (by pid: SIGTERM, then SIGKILL after ``timeout``), reap it, remove files.

        Idempotent; safe to call on a VM that already exited.
        """
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        else:
            self.process.wait()
        for path in (self.disk_path, self.channel_path, self.console_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> BootedVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def create_overlay(base: Path, overlay: Path, size: int | None = None) -> None:
    """qcow2 overlay of raw ``base`` (left pristine); ``size`` grows the virtual disk."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.resolve())]
    cmd.append(str(overlay))
    if size is not None:
        cmd.append(str(size))
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"qemu-img create failed: {proc.stderr.strip()}")


def host_cmdline(cmdline: str) -> str:
    """The image's command line with this host's TSC rate (see images/hosttsc.py).

    The manifest carries the build host's rate; a VM booted on another host must use
    its own, or the guest kernel's clock runs at the wrong speed.
    """
    try:
        khz = tsc_khz_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        khz = None
    return with_tsc_khz(cmdline, khz)


def load_image(image_dir: Path) -> ImageInfo:
    """The image in ``image_dir``; if it cannot boot here: ``pytest.skip`` under pytest
    (with the reason), :class:`HarnessError` elsewhere (benchmarks, scripts)."""
    reason = missing_reason(image_dir)
    if reason is None:
        try:
            return ImageInfo.load(image_dir)
        except (OSError, ValueError, KeyError) as exc:
            reason = f"image {image_dir} has an unreadable manifest ({exc}): run `make image`"
    if "PYTEST_CURRENT_TEST" in os.environ:
        pytest.skip(reason=reason)
    raise HarnessError(reason)


def boot_vm(
    image: ImageInfo | Path,
    workdir: Path,
    *,
    memory_mib: int = 256,
    cpus: int = 1,
    disk_size: int | None = None,
    tb_size_mib: int = 64,
) -> BootedVM:
    """Start QEMU on a fresh overlay of ``image`` in ``workdir`` and return at once.

    ``image`` is an :class:`ImageInfo` or an image directory (``build/images/<name>``,
    see :func:`~tests.harness.images.image_dir`); a directory whose image is not built,
    or a host without QEMU, skips the calling test (see :func:`load_image`).

    ``disk_size`` (bytes) makes the virtual disk larger than the image; the guest's
    init grows its filesystem to match.  The caller waits for what it needs
    (:meth:`BootedVM.wait_for_console`, :meth:`BootedVM.connect_channel`) and stops the
    VM (or uses it as a context manager).
    """
    if isinstance(image, Path):
        image = load_image(image)
    workdir.mkdir(parents=True, exist_ok=True)
    if disk_size is not None and disk_size < image.rootfs.stat().st_size:
        raise HarnessError(f"disk_size {disk_size} is smaller than the image")
    disk = workdir / "disk.qcow2"
    create_overlay(image.rootfs, disk, disk_size)
    cfg = QemuConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=host_cmdline(image.cmdline),
        disk=disk,
        channel=workdir / "agent.sock",
        console=workdir / "console.log",
        memory_mib=memory_mib,
        cpus=cpus,
        tb_size_mib=tb_size_mib,
    )
    with contextlib.suppress(FileNotFoundError):
        cfg.channel.unlink()
    stderr = (workdir / "qemu.stderr").open("wb")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            qemu_argv(cfg),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            # Its own session: a terminal's Ctrl-C goes to pytest, which stops the VM.
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    except OSError as exc:
        disk.unlink(missing_ok=True)
        raise HarnessError(f"cannot start QEMU: {exc}") from exc
    finally:
        stderr.close()
    return BootedVM(process, workdir, started)
