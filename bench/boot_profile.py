"""Where a cold boot's time goes between the guest's init and the agent's hello.

Boots the ``minimal`` image through the real VM engine with
``PYTHONPROFILEIMPORTTIME=1`` on the kernel command line (the kernel hands
unknown ``KEY=VALUE`` parameters to init as environment, and agentiso-init
passes its environment to python), then reads the console: the agent's boot
timings from its hello and Python's ``-X importtime`` lines, summed per
top-level module, slowest first.

Run: ``.venv/bin/python -m bench.boot_profile [--top N]`` (root, ``make image``);
``--plain --boots 5`` for real (unprofiled) boot timings, ``--image-dir`` to
boot another build of the image (``python -m images.build --build-dir``).
Not part of ``make bench`` (the profile itself slows the boot); a tool to find
what to cut.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio.abc

from agentiso.frontend.guest_client import GuestClient
from agentiso.privhelper import log
from agentiso.privhelper.vm.spec import DiskLayer
from bench.procfs import cpu_seconds
from tests.harness.engine import engine_vm
from tests.harness.images import image_dir
from tests.harness.vm import create_overlay

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(console: str) -> list[tuple[str, int, int, int]]:
    """(module, self us, cumulative us, depth) for each ``-X importtime`` line."""
    out = []
    for m in LINE.finditer(console):
        out.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    return out


async def boot_once(
    image: Path, extra: str, workdir: Path, i: int
) -> tuple[float, float, Any, str]:
    """Boot ``image`` once: (QEMU start -> hello s, QEMU's CPU s until then, the
    hello's boot timings, the console).  The CPU time is the figure that holds
    on a loaded host (wall times there depend on who else runs)."""
    disk = workdir / f"disk{i}.qcow2"
    create_overlay(image / "rootfs.img", disk, None)
    cmdline = json.loads((image / "manifest.json").read_text())["cmdline"]
    disks = (DiskLayer(format="qcow2", path=str(disk)),
             DiskLayer(format="raw", path=str(image / "rootfs.img"), read_only=True))
    with engine_vm("minimal", cmdline=f"{cmdline} {extra}".strip(), disks=disks,
                   kernel=str(image / "vmlinuz"), initrd=str(image / "initrd.img")) as vm:
        sock = await anyio.to_thread.run_sync(vm.connect_channel, 60.0)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        async with GuestClient.connect(stream, hello_timeout=180) as c:
            hello_s = time.monotonic() - vm.started
            cpu = cpu_seconds(vm.pid)
            assert c.hello is not None
            b = c.hello.boot
        await stream.aclose()
        console = await anyio.to_thread.run_sync(vm.console_text)
    return hello_s, cpu, b, console


async def amain(args: argparse.Namespace) -> int:
    log.configure("warning")
    images = list(args.image_dir) or [image_dir("minimal")]
    extra = "" if args.plain else "PYTHONPROFILEIMPORTTIME=1"
    gaps: dict[Path, list[float]] = {im: [] for im in images}
    hellos: dict[Path, list[float]] = {im: [] for im in images}
    cpus: dict[Path, list[float]] = {im: [] for im in images}
    with tempfile.TemporaryDirectory(prefix="agbp", dir="/tmp") as tmp:
        os.chmod(tmp, 0o711)
        for i in range(args.boots):
            for k, image in enumerate(images):  # round by round: the same load for each
                hello_s, cpu, b, console = await boot_once(image, extra, Path(tmp), i * 10 + k)
                cpus[image].append(cpu)
                gap = b.agent_start - (b.init_t0 or 0.0)
                gaps[image].append(gap)
                hellos[image].append(hello_s)
                print(f"{image}: boot {i + 1}: QEMU start -> hello {hello_s:.2f} s "
                      f"(QEMU CPU {cpu:.2f} s); guest uptime: init {b.init_t0}, agent start "
                      f"{b.agent_start:.2f} (init -> agent {gap:.2f} s), listening "
                      f"{b.listen:.2f}, hello {b.hello:.2f}", flush=True)
    for image in images:
        g, h, c = gaps[image], hellos[image], cpus[image]
        print(f"{image}: init -> agent start median {statistics.median(g):.2f} s "
              f"(min {min(g):.2f}); QEMU start -> hello median {statistics.median(h):.2f} s "
              f"(min {min(h):.2f}); QEMU CPU to hello median {statistics.median(c):.2f} s "
              f"(min {min(c):.2f}); n={len(g)}{'' if args.plain else ' (profiled)'}")
    if args.console:
        await anyio.Path(args.console).write_text(console)
    if not args.plain:
        print_profile(parse_importtime(console), args.top)
    return 0


def print_profile(rows: list[tuple[str, int, int, int]], top: int) -> None:
    tops = [r for r in rows if r[3] == 0]
    total = sum(r[2] for r in tops)
    print(f"imports (profiled, so slower than a real boot): {len(rows)} modules, "
          f"{total / 1e6:.2f} s at top level")
    for name, _self, cum, _ in sorted(tops, key=lambda r: -r[2])[:top]:
        print(f"  {cum / 1000:8.1f} ms  {name}")
    print("slowest by own time:")
    for name, own, _cum, depth in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"  {own / 1000:8.1f} ms  {'  ' * depth}{name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--boots", type=int, default=1)
    p.add_argument("--plain", action="store_true", help="no -X importtime: real boot timings")
    p.add_argument("--image-dir", action="append", default=[], type=lambda d: Path(d).absolute(),
                   help="an image directory (default: build/images/minimal); repeat to "
                   "compare builds, booted in turn")
    p.add_argument("--console", metavar="FILE", help="write the last boot's console here")
    return anyio.run(amain, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
