"""The images seen from inside: commands run in a booted guest through its agent.

One VM per image for the module (``minimal`` always; ``dev`` when it is built),
driven over the virtio-serial channel by the frontend's GuestClient.  These check
what the image promises its users: the tools are there and work, the root
filesystem has grown to the disk, the kernel is the manifest's, and nothing of
vsock appears on a VM without a vsock device.

They are about the image itself, so the raw launcher (:mod:`tests.harness.vm`)
boots it with nothing but the image's own files and command line; tests of the
agent or of the helper boot through the VM engine (:mod:`tests.harness.engine`).
"""

from __future__ import annotations

import json

import pytest

from agentiso.frontend.guest_client import GuestClient
from tests.harness.fixtures import vm_fixture
from tests.harness.guest import connect
from tests.harness.images import image_dir
from tests.harness.vm import BootedVM

pytestmark = pytest.mark.anyio
MiB = 1 << 20
DISK = 1024 * MiB

minimal_vm = vm_fixture("minimal", scope="module", disk_size=DISK)
dev_vm = vm_fixture("dev", scope="module")


async def sh(c: GuestClient, script: str) -> str:
    r = await c.exec(shell=script, timeout_s=120)
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


async def test_minimal_tools_and_python_packages(minimal_vm: BootedVM) -> None:
    async with connect(minimal_vm) as c:
        out = await sh(
            c,
            "python3 -c 'import sys, msgspec, agentiso.guest, agentiso.protocol;"
            " print(sys.version_info[:2], msgspec.__version__)';"
            " ip -V; resize2fs 2>&1 | head -1; fsfreeze --version; ps --version;"
            " modprobe --version",
        )
    manifest = json.loads((image_dir("minimal") / "manifest.json").read_text())
    assert f"(3, 11) {manifest['versions']['msgspec']}" in out
    for tool in ("iproute2", "resize2fs", "util-linux", "procps", "kmod"):
        assert tool in out, (tool, out)


async def test_root_grown_to_the_disk_and_api_filesystems_mounted(minimal_vm: BootedVM) -> None:
    async with connect(minimal_vm) as c:
        size = int(await sh(c, "df -B1 --output=size / | tail -1"))
        mounts = await sh(c, "cat /proc/mounts")
        lo = await sh(c, "cat /sys/class/net/lo/operstate")
    # ext4 keeps some of the disk for its own metadata.
    assert DISK * 0.9 < size <= DISK
    for mp, fstype in [
        ("/", "ext4"),
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ]:
        assert f" {mp} {fstype} " in mounts, (mp, mounts)
    assert lo.strip() in ("unknown", "up")


async def test_kernel_cmdline_and_devices(minimal_vm: BootedVM) -> None:
    async with connect(minimal_vm) as c:
        cmdline = await sh(c, "cat /proc/cmdline")
        release = await sh(c, "uname -r")
        modules = await sh(c, "cut -d' ' -f1 /proc/modules")
        vsock = (await c.exec(["test", "-e", "/dev/vsock"])).exit_code
        clock = await sh(c, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
        hostname = await sh(c, "hostname")
    manifest = json.loads((image_dir("minimal") / "manifest.json").read_text())
    assert release.strip() == manifest["versions"]["kernel_release"]
    assert "tsc=reliable" in cmdline and "tsc_early_khz=" in cmdline
    assert clock.strip() == "tsc"
    loaded = set(modules.split())
    assert {"virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng"} <= loaded
    # No vsock device in this VM: no vsock modules, no /dev/vsock; no NIC: no virtio_net.
    assert not loaded & {"vsock", "vmw_vsock_virtio_transport", "virtio_net"}
    assert vsock == 1
    assert hostname.strip() == "agentiso"


async def test_dev_image_compiles_and_has_git_and_curl(dev_vm: BootedVM) -> None:
    async with connect(dev_vm) as c:
        out = await sh(
            c,
            "cd /tmp && printf '#include <stdio.h>\\nint main(void){puts(\"hi\");return 0;}\\n'"
            " > t.c && cc -O0 -o t t.c && ./t && git --version && curl --version | head -1"
            " && test -s /etc/ssl/certs/ca-certificates.crt && make --version | head -1",
        )
    lines = out.splitlines()
    assert lines[0] == "hi"
    assert any(line.startswith("git version") for line in lines)
    assert any(line.startswith("curl ") for line in lines)
    assert any(line.startswith("GNU Make") for line in lines)


async def test_commands_do_not_inherit_the_agents_hash_seed(minimal_vm: BootedVM) -> None:
    async with connect(minimal_vm) as c:
        agent_env = await sh(c, "tr '\\0' '\\n' < /proc/1/environ")
        own_env = await sh(c, "env")
    # The init seeds the agent's hash randomisation (no entropy wait at boot)...
    assert "PYTHONHASHSEED=" in agent_env
    # ...but the commands it runs get per-process randomisation.
    assert "PYTHONHASHSEED" not in own_env
