"""The boot harness's process handling, against a real QEMU.

These do not wait for the guest to boot: they check that the harness cleans up
and reports a dead VM, whatever state the guest is in.  The raw launcher is
what is under test here; tests of the agent or of the helper boot through the
VM engine (:mod:`tests.harness.engine`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness.images import require_image
from tests.harness.vm import HarnessError, boot_vm


def test_stop_kills_qemu_reaps_it_and_removes_its_files(tmp_path: Path) -> None:
    vm = boot_vm(require_image("minimal"), tmp_path)
    try:
        assert vm.alive()
        assert vm.disk_path.exists()
        vm.connect_channel().close()  # QEMU is listening on the agent socket
    finally:
        vm.stop()
    assert vm.process.returncode is not None  # reaped: no zombie left behind
    with pytest.raises(ProcessLookupError):
        os.kill(vm.pid, 0)
    for path in (vm.disk_path, vm.channel_path, vm.console_path, vm.stderr_path):
        assert not path.exists(), path
    vm.stop()  # idempotent
    # The base image is untouched: a fresh overlay was the only disk.
    assert require_image("minimal").rootfs.exists()


def test_a_dead_vm_is_reported_with_its_console(tmp_path: Path) -> None:
    with boot_vm(require_image("minimal"), tmp_path) as vm:
        os.kill(vm.pid, signal.SIGKILL)
        with pytest.raises(HarnessError, match="QEMU exited"):
            vm.wait_for_console("never printed", timeout=30)
        with pytest.raises(HarnessError, match="cannot connect"):
            vm.connect_channel(timeout=1)
