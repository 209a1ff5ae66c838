"""Boot the real ``minimal`` image under TCG and check the boot chain.

Needs ``make image`` first (the top-level ``make test`` does it); skipped with the
reason when the image or QEMU is missing.  One VM is booted for the module.

The raw launcher (:mod:`tests.harness.vm`), not the VM engine, boots it: this is a
test of the image's own boot chain (kernel, initramfs, init, the agent's first
bytes), which must work on a plain QEMU command line.  Tests of the agent or of
the helper boot through the engine (:mod:`tests.harness.engine`).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.protocol import guest as gp
from tests.harness.fixtures import vm_fixture
from tests.harness.images import require_image
from tests.harness.vm import BootedVM

DISK_SIZE = 1 << 30  # larger than the image, so the init must grow the filesystem
BOOT_TIMEOUT = 60.0  # generous: two cores shared with other VMs under TCG

INIT_STARTED = r"agentiso-init: started at ([0-9.]+)s"
INIT_EXEC = r"agentiso-init: exec python3 -m agentiso.guest"
AGENT_MISSING = "No module named agentiso.guest.__main__"


minimal_vm = vm_fixture("minimal", scope="module", disk_size=DISK_SIZE)


@pytest.fixture(scope="module")
def booted(minimal_vm: BootedVM) -> Iterator[tuple[BootedVM, socket.socket]]:
    # Connect before the guest is up, as the helper does: the agent's first frame
    # must not be lost to a late connection.
    sock = minimal_vm.connect_channel()
    try:
        minimal_vm.wait_for_console(INIT_EXEC, BOOT_TIMEOUT)
        yield minimal_vm, sock
    finally:
        sock.close()


def test_init_runs_and_execs_the_agent(booted: tuple[BootedVM, socket.socket]) -> None:
    vm, _ = booted
    text = vm.console_text()
    started = re.search(INIT_STARTED, text)
    assert started is not None, vm.tail()
    # The uptime at init start is recorded for the agent's boot timings.
    assert 0.0 < float(started.group(1)) < BOOT_TIMEOUT
    assert "agentiso-initramfs: FATAL" not in text


def test_root_filesystem_grown_to_the_disk(booted: tuple[BootedVM, socket.socket]) -> None:
    vm, _ = booted
    match = re.search(r"root filesystem grown to (\d+) MiB", vm.console_text())
    assert match is not None, vm.tail()
    assert int(match.group(1)) == DISK_SIZE >> 20


def test_agent_says_hello_on_the_channel(booted: tuple[BootedVM, socket.socket]) -> None:
    """The agent, started by the init as PID 1, greets on the virtio-serial port."""
    vm, sock = booted
    deadline = time.monotonic() + 30.0
    decoder = gp.GuestStreamDecoder()
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            vm.process.wait(5.0)  # QEMU exits when the guest panics (init died)
            if AGENT_MISSING in vm.console_text():
                pytest.skip(reason="this image has no agent yet (guest/__main__.py missing)")
            pytest.fail(f"channel closed by QEMU\n{vm.tail()}")
        frames = [item for item in decoder.feed(chunk) if item is not None]
        if frames:
            hello = gp.response_codec.decode(frames[0])
            assert isinstance(hello, gp.Hello), hello
            assert hello.transport == "virtio-serial"
            assert hello.pid1
            # The init's start time reached the agent through AGENTISO_INIT_T0.
            init_t0 = hello.boot.init_t0
            assert init_t0 is not None
            started = re.search(INIT_STARTED, vm.console_text())
            assert started is not None
            assert abs(init_t0 - float(started.group(1))) < 0.01
            assert init_t0 <= hello.boot.agent_start <= hello.boot.hello
            return
    pytest.fail(f"no hello from the agent within 30 s\n{vm.tail()}")


def test_base_image_stays_pristine(booted: tuple[BootedVM, socket.socket]) -> None:
    vm, _ = booted
    image = require_image("minimal")
    # The VM writes to its overlay only; the image's recorded size is untouched.
    files = image.manifest["files"]
    assert isinstance(files, dict)
    assert image.rootfs.stat().st_size == files["rootfs.img"]["size"]
    assert Path(vm.disk_path).exists()
