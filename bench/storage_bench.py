"""Volume layer benchmark (root for zfs; qcow2 runs anywhere).

For each backend (qcow2 in a temporary directory; zfs on a zfs-fuse pool the
harness starts, file mode) it prints:

* base import time (the ``minimal`` image's rootfs.img if built, else a sparse file);
* volume clone time from a base (fresh volume, copy-on-write);
* after writing 1 GiB of incompressible data into a volume: snapshot time,
  clone-from-snapshot time, rollback time, delete-snapshot time (merge on
  qcow2) and destroy time — medians over a few repetitions;
* the used bytes the backend reports for that volume.

Run: ``.venv/bin/python -m bench.storage_bench`` (or ``python -m bench storage``).
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio

from agentiso.privhelper.storage import FromBase, FromSnapshot, VolumeBackend, ZfsConfig
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.zfs import ZfsBackend
from tests.harness.zfs import ZfsUnavailable, zfs_fuse_pool

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
FILL = 1024 * MIB
CHUNK = 64 * MIB
REPS = 5

T = TypeVar("T")


async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = await fn()
    return time.perf_counter() - t0, out


def ms(samples: list[float]) -> str:
    med = statistics.median(samples) * 1000
    lo, hi = min(samples) * 1000, max(samples) * 1000
    return f"median {med:8.1f} ms  (min {lo:.1f}, max {hi:.1f}, n={len(samples)})"


def base_source(tmp: Path) -> Path:
    built = REPO / "build" / "images" / "minimal" / "rootfs.img"
    if built.exists():
        return built
    src = tmp / "rootfs.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "2G"], check=True)
    return src


async def fill(b: VolumeBackend, vol: str, tmp: Path) -> float:
    """Write FILL bytes of random data through the volume's top; returns seconds."""
    pattern = tmp / "random.bin"
    if not pattern.exists():
        pattern.write_bytes(os.urandom(CHUNK))
    top = (await b.attachment(vol)).top
    cmds: list[str] = []
    for off in range(0, FILL, CHUNK):
        cmds += ["-c", f"write -s {pattern} {off} {CHUNK}"]
    t0 = time.perf_counter()
    await anyio.run_process(["qemu-io", "-f", str(top.format), *cmds, str(top.path)])
    return time.perf_counter() - t0


async def bench(b: VolumeBackend, label: str, tmp: Path) -> None:
    print(f"\n[{label}]", flush=True)
    await b.setup()
    src = base_source(tmp)
    t, info = await timed(lambda: b.import_base("minimal", src))
    print(f"  import base ({info.virtual_size // MIB} MiB virtual):   {t * 1000:8.1f} ms")

    samples = []
    for i in range(REPS):
        t, _ = await timed(lambda i=i: b.create_volume(f"fresh{i}", FromBase("minimal")))  # type: ignore[misc]
        samples.append(t)
    print(f"  clone volume from base:            {ms(samples)}")
    for i in range(REPS):
        await b.destroy_volume(f"fresh{i}")

    await b.create_volume("big", FromBase("minimal"), size=max(info.virtual_size, 2 * FILL))
    secs = await fill(b, "big", tmp)
    used = (await b.volume_info("big")).used_bytes
    rate = FILL / MIB / secs
    print(f"  wrote {FILL // MIB} MiB into the volume:       {secs:8.1f} s  ({rate:.0f} MiB/s)")
    print(f"  used bytes reported:               {used / MIB:8.1f} MiB")

    snaps, clones, destroys = [], [], []
    for i in range(REPS):
        t, _ = await timed(lambda i=i: b.snapshot("big", f"s{i}"))  # type: ignore[misc]
        snaps.append(t)
        t, _ = await timed(lambda i=i: b.create_volume(f"c{i}", FromSnapshot("big", f"s{i}")))  # type: ignore[misc]
        clones.append(t)
    for i in range(REPS):
        t, _ = await timed(lambda i=i: b.destroy_volume(f"c{i}"))  # type: ignore[misc]
        destroys.append(t)
    print(f"  snapshot (1 GiB used):             {ms(snaps)}")
    print(f"  clone volume from that snapshot:   {ms(clones)}")
    print(f"  destroy a clone:                   {ms(destroys)}")
    t, _ = await timed(lambda: b.rollback("big", "s2"))
    print(f"  rollback past 2 later snapshots:   {t * 1000:8.1f} ms")
    deletes = []
    for i in (1, 0):
        t, _ = await timed(lambda i=i: b.delete_snapshot("big", f"s{i}"))  # type: ignore[misc]
        deletes.append(t)
    print(f"  delete snapshot (holds 1 GiB):     {ms(deletes)}")
    t, _ = await timed(lambda: b.destroy_volume("big"))
    print(f"  destroy the 1 GiB volume:          {t * 1000:8.1f} ms")
    await b.delete_base("minimal")


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as d:
        tmp = Path(d)
        await bench(Qcow2Backend(tmp / "qcow2", min_size=MIB), "qcow2", tmp)
        if os.geteuid() != 0:
            print("\n[zfs] skipped: needs root (zfs-fuse)")
            return 0
        try:
            with zfs_fuse_pool(tmp / "zfs", size=8 * 1024**3) as pool:
                root = f"{pool.name}/bench{secrets.token_hex(2)}"
                b = ZfsBackend(ZfsConfig(dataset=root), min_size=MIB)
                try:
                    await bench(b, "zfs on zfs-fuse (file mode, compression fallback)", tmp)
                finally:
                    await anyio.run_process(["zfs", "destroy", "-R", root], check=False)
        except ZfsUnavailable as exc:
            print(f"\n[zfs] skipped: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
