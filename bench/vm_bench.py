"""VM engine benchmark (root; real QEMU with the `minimal` image).

Prints:
* VM start -> first frame from the guest agent (its hello) on the virtio-serial
  channel, through :class:`VmEngine` (spawn as an unprivileged uid, QMP
  connect, console attach, ``cont``), median and spread over a few runs;
* memory snapshot: save time and size (QMP ``migrate`` to an fd) and restore
  time (new QEMU with ``-incoming fd:N`` until running), then the time until
  the restored agent answers again;
* idle QEMU RSS after the guest settles (TCG, tb-size from the settings).

Run: ``.venv/bin/python -m bench.vm_bench`` (or ``python -m bench vm``).
Numbers depend on host load: 2 shared cores under TCG here.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from agentiso.privhelper import log
from agentiso.privhelper.vm.engine import EngineSettings, VmConfig, VmEngine
from agentiso.privhelper.vm.spec import DiskLayer
from bench import report
from bench.procfs import pss_kib, rss_kib
from tests.harness.images import unusable_reason

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "build" / "images" / "minimal"
RUNS = 3
SYNC_MARKER = b"\xffAGENTISO-GUEST-SYNC-1\xff"


def overlay(base: Path, name: str) -> Path:
    path = base / f"{name}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
         "-b", str(IMAGE / "rootfs.img"), str(path)],
        check=True,
    )  # fmt: skip
    return path


def config(name: str, disk: Path, cmdline: str, **kw: object) -> VmConfig:
    return VmConfig(
        name=name,
        kernel=str(IMAGE / "vmlinuz"),
        initrd=str(IMAGE / "initrd.img"),
        cmdline=cmdline,
        disks=(
            DiskLayer(format="qcow2", path=str(disk)),
            DiskLayer(format="raw", path=str(IMAGE / "rootfs.img"), read_only=True),
        ),
        **kw,  # type: ignore[arg-type]
    )


async def first_frame(engine: VmEngine, name: str, timeout: float = 120.0) -> bytes:
    """Connect to the guest channel and return the first bytes of the agent's hello."""
    with anyio.fail_after(timeout):
        async with await anyio.connect_unix(engine.channel_socket(name)) as s:
            data = b""
            while len(data) < len(SYNC_MARKER) + 8:
                data += await s.receive()
            return data


async def main() -> int:
    if os.geteuid() != 0:
        print("vm_bench: needs root (QEMU runs as per-VM uids)")
        return 1
    reason = unusable_reason(IMAGE)
    if reason is not None:
        print(f"vm_bench: {reason}")
        return 1
    log.configure("warning")
    cmdline = json.loads((IMAGE / "manifest.json").read_text())["cmdline"]
    base = Path(tempfile.mkdtemp(prefix="agvb", dir="/tmp"))
    os.chmod(base, 0o711)
    settings = EngineSettings(state_dir=str(base / "state"), run_dir=str(base / "run"))
    try:
        async with VmEngine.running(settings) as engine:
            d = await engine.probe_accelerator(str(IMAGE / "vmlinuz"))
            print(f"accelerator: {d.kind} ({d.reason}); tb-size {settings.tb_size_mib} MiB")

            starts, hellos = [], []
            for i in range(RUNS):
                name = f"bench-{i}"
                disk = overlay(base, name)
                t0 = time.monotonic()
                await engine.start(config(name, disk, cmdline))
                t1 = time.monotonic()
                frame = await first_frame(engine, name)
                t2 = time.monotonic()
                assert frame.startswith(SYNC_MARKER), frame[:32]
                starts.append(t1 - t0)
                hellos.append(t2 - t0)
                if i < RUNS - 1:
                    await engine.kill(name)
                    engine.forget(name)
            print(
                "engine.start() (spawn, QMP, console, cont): "
                f"median {statistics.median(starts):.3f} s"
            )
            print(
                f"VM start -> agent hello: median {statistics.median(hellos):.2f} s "
                f"(min {min(hellos):.2f}, max {max(hellos):.2f}, n={RUNS})"
            )

            name = f"bench-{RUNS - 1}"
            await anyio.sleep(3)  # let the guest go idle
            pid = engine.status(name).pid
            rss, pss = rss_kib(pid) / 1024, pss_kib(pid) / 1024
            print(f"idle QEMU (256 MiB guest): RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")

            mem = base / "bench.mem"
            fd = os.open(mem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                saved = await engine.save_memory(name, fd)
            finally:
                os.close(fd)
            print(
                f"memory snapshot save: {saved.seconds:.2f} s, "
                f"{saved.bytes_written / 2**20:.0f} MiB"
            )
            await engine.kill(name)
            engine.forget(name)
            fd = os.open(mem, os.O_RDONLY)
            try:
                t0 = time.monotonic()
                await engine.start(
                    config("bench-r", base / f"{name}.qcow2", cmdline, incoming_fd=fd)
                )
                t1 = time.monotonic()
            finally:
                os.close(fd)
            await first_frame(engine, "bench-r")
            t2 = time.monotonic()
            print(f"memory snapshot restore: {t1 - t0:.2f} s to running, {t2 - t0:.2f} s to hello")
            report.record("vm", {
                "boot_to_hello": statistics.median(hellos), "boot_to_hello_all": hellos,
                "engine_start": statistics.median(starts), "idle_rss_mib": rss,
                "idle_pss_mib": pss, "mem_save": saved.seconds,
                "mem_size_mib": saved.bytes_written / 2**20,
                "resume_to_running": t1 - t0, "resume_to_hello": t2 - t0,
            })
            for n in engine.names():
                await engine.kill(n)
                engine.forget(n)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
