"""A test VM started by the real VM engine (:mod:`agentiso.privhelper.vm.engine`).

Tests that boot a guest to test the agent, or anything the helper does with a
VM, use this: QEMU is launched exactly as in production (its own uid, the
seccomp sandbox, fds for disks and sockets, the host's TSC rate), not by a
second launcher.  Only tests about the image itself use the raw launcher in
:mod:`tests.harness.vm`.

The engine runs on its own event loop in a thread (an anyio blocking portal),
so a module-scoped, synchronous fixture can hold a VM while each test drives
it from its own loop over the channel socket::

    from tests.harness.engine import engine_vm_fixture
    guest_vm = engine_vm_fixture("minimal", scope="module")

    async def test_x(guest_vm):
        async with connect(guest_vm) as client: ...   # tests.harness.guest
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from agentiso.privhelper.vm.engine import FINISHED, EngineSettings, VmConfig, VmEngine
from agentiso.privhelper.vm.errors import VmError
from agentiso.privhelper.vm.procfs import read_stat
from agentiso.privhelper.vm.record import live_pids
from agentiso.privhelper.vm.spec import DiskLayer

from .fixtures import Scope
from .images import image_dir, pin_image, require_image
from .vm import HarnessError, create_overlay


class EngineVM:
    """One VM the engine runs for a test.  Offers what :mod:`tests.harness.guest`
    needs (``connect_channel``, ``tail``) plus the console and liveness."""

    def __init__(self, portal: BlockingPortal, engine: VmEngine, name: str, pid: int) -> None:
        self._portal = portal
        self._engine = engine
        self.name = name
        self.pid = pid
        self.channel_path = Path(engine.channel_socket(name))
        #: time.monotonic() when QEMU was spawned (from /proc, to 1/CLK_TCK s).
        self.started = _spawned_at(pid)

    def console_text(self) -> str:
        data: bytes = self._portal.call(self._engine.console_tail, self.name, 1 << 20)
        return data.decode(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self._portal.call(self._engine.status, self.name).state not in FINISHED

    def connect_channel(self, timeout: float = 10.0) -> socket.socket:
        """A connected blocking socket to the agent channel."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.channel_path))
                return sock
            except OSError as exc:
                sock.close()
                if not self.alive() or time.monotonic() > deadline:
                    raise HarnessError(f"cannot connect to {self.channel_path}: {exc}") from exc
                time.sleep(0.05)

    def wait_for_console(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Poll the console until regex ``pattern`` matches; return the match.
        Raises :class:`HarnessError` with the console tail on timeout or if QEMU ends."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not (match := regex.search(self.console_text())):
            if not self.alive():
                raise HarnessError(f"the VM ended before {pattern!r} appeared\n{self.tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{pattern!r} not on the console after {timeout} s\n"
                                   f"{self.tail()}")
            time.sleep(0.05)
        return match

    def shut_down(self, powerdown_timeout: float = 10.0) -> None:
        """Stop the VM the engine's clean way (ACPI powerdown, then QMP ``quit``,
        SIGKILL last), so QEMU flushes its disk caches; then forget it."""
        with contextlib.suppress(VmError):
            self._portal.call(
                functools.partial(self._engine.stop, self.name,
                                  powerdown_timeout=powerdown_timeout)
            )
        self.stop()

    def stop(self) -> None:
        """Kill the VM and forget it (idempotent)."""
        with contextlib.suppress(VmError):
            self._portal.call(self._engine.kill, self.name)
        with contextlib.suppress(VmError):
            self._portal.call(self._engine.forget, self.name)


@contextlib.contextmanager
def engine_vm(
    image: str = "minimal", *, memory_mib: int = 256, disk_size: int | None = None,
    vcpus: int = 1, **config: Any,
) -> Iterator[EngineVM]:
    """Boot ``image`` through a private :class:`VmEngine` (skipping the test when the
    image or QEMU is missing); on exit the VM is killed and every file removed.

    Returns once QEMU runs; the caller waits for the agent (e.g. by connecting).
    ``disk_size`` (bytes) makes the disk larger than the image; the guest's init
    grows its filesystem to match.  Other keywords go to :class:`VmConfig` as they
    are (``net=NetAttachment(...)`` for a NIC, ``secret=...``, ``disks=...`` to
    boot other disk layers than a fresh overlay of the image)."""
    require_image(image)
    # Short (socket paths <= 107 bytes) and traversable by the VMs' uids.
    base = Path(tempfile.mkdtemp(prefix="agvm", dir="/tmp"))
    os.chmod(base, 0o711)
    try:
        info = pin_image(image_dir(image), base / "image")
        disk = base / "disk.qcow2"
        if "disks" not in config:
            create_overlay(info.rootfs, disk, disk_size)
        settings = EngineSettings(state_dir=str(base / "state"), run_dir=str(base / "run"),
                                  accel="auto")
        name = "h" + secrets.token_hex(4)
        cfg = VmConfig(
            name=name, kernel=str(info.kernel), initrd=str(info.initrd), cmdline=info.cmdline,
            disks=(DiskLayer(format="qcow2", path=str(disk)),
                   DiskLayer(format="raw", path=str(info.rootfs), read_only=True)),
            vcpus=vcpus, memory_mib=memory_mib,
        )
        if config:
            cfg = msgspec.structs.replace(cfg, **config)
        with start_blocking_portal() as portal, \
                portal.wrap_async_context_manager(VmEngine.running(settings)) as engine:
            status = portal.call(engine.start, cfg)
            vm = EngineVM(portal, engine, name, status.pid)
            try:
                yield vm
            finally:
                vm.stop()
    finally:
        _kill_leftovers(base)
        shutil.rmtree(base, ignore_errors=True)


def engine_vm_fixture(
    image: str = "minimal", *, scope: Scope = "module", **kwargs: Any
) -> Callable[..., Iterator[EngineVM]]:
    """A fixture that boots ``image`` through the engine and stops it afterwards."""

    @pytest.fixture(scope=scope)
    def _vm() -> Iterator[EngineVM]:
        with engine_vm(image, **kwargs) as vm:
            yield vm

    return _vm


def _spawned_at(pid: int) -> float:
    """The time.monotonic() at which process ``pid`` started (now, if it is gone)."""
    st = read_stat(pid)
    if st is None:
        return time.monotonic()
    ago = time.clock_gettime(time.CLOCK_BOOTTIME) - st.start_time / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - ago


def _kill_leftovers(base: Path) -> None:
    """Kill any QEMU the engine recorded under ``base`` that still runs (by pid,
    checked to be the same process): a failure between spawn and the engine's
    own kill must not leave one running."""
    for pid in live_pids(base / "state" / "vm" / "records"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
