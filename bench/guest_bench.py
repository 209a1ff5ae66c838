"""Guest agent benchmarks: boot to hello, exec round trip, file transfer rates.

Run: ``.venv/bin/python -m bench.guest_bench [--boots N] [--execs N] [--mib N]``
(or ``make bench``).  Boots the ``minimal`` image under TCG through the real VM
engine, as the helper does (:func:`tests.harness.engine.engine_vm`; needs root
and a built image: ``make image``), and talks to the agent over the raw
virtio-serial channel with GuestClient; then the same exec and transfer figures
for an in-process agent over a socketpair, as a baseline without the VM.  Boot
times run from QEMU's process start (read from /proc, to 10 ms) to the agent's
hello.  Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.abc

from agentiso.frontend.guest_client import GuestClient
from agentiso.privhelper import log
from agentiso.protocol import guest as gp
from bench import report
from tests.harness.engine import EngineVM, engine_vm
from tests.harness.images import image_dir, unusable_reason

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
#: What this run measured, recorded as part "guest" at the end.
FIGURES: dict[str, object] = {}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def exec_round_trips(c: GuestClient, n: int) -> list[float]:
    await c.exec(["true"])  # warm: page cache, first fork
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await c.exec(["true"])
        times.append(time.perf_counter() - t)
    return times


async def ping_round_trips(c: GuestClient, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await c.ping()
        times.append(time.perf_counter() - t)
    return times


async def transfer(c: GuestClient, mib: int, guest_path: str, workdir: Path) -> tuple[float, float]:
    """(host->guest MiB/s, guest->host MiB/s) for a ``mib`` MiB file."""
    src = workdir / "bench-src.bin"
    with src.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    t = time.perf_counter()
    up = await c.upload_file(src, guest_path, chunk_size=gp.MAX_CHUNK, window=8)
    up_s = time.perf_counter() - t
    back = workdir / "bench-back.bin"
    t = time.perf_counter()
    down = await c.download_file(guest_path, back, chunk_size=gp.MAX_CHUNK, window=8)
    down_s = time.perf_counter() - t
    assert up.sha256 == down.sha256
    await c.remove(guest_path)
    src.unlink()
    back.unlink()
    return mib / up_s, mib / down_s


def report_latency(label: str, times: list[float], key: str = "") -> None:
    ms = [t * 1000 for t in times]
    if key:
        FIGURES[f"{key}_p50_ms"] = pct(ms, 50)
        FIGURES[f"{key}_p99_ms"] = pct(ms, 99)
    print(f"  {label}: p50 {pct(ms, 50):.2f} ms  p99 {pct(ms, 99):.2f} ms  "
          f"min {min(ms):.2f} ms  (n={len(ms)})")


async def boot_once(stack: contextlib.ExitStack) -> tuple[EngineVM, float, gp.Hello]:
    """Boot a VM (stopped when ``stack`` closes); seconds from QEMU's start to hello."""
    vm = await anyio.to_thread.run_sync(
        stack.enter_context, engine_vm("minimal", disk_size=1024 * MiB)
    )
    sock = await anyio.to_thread.run_sync(vm.connect_channel, 30.0)
    stream = await anyio.abc.SocketStream.from_socket(sock)
    async with GuestClient.connect(stream, hello_timeout=120) as c:
        hello_s = time.monotonic() - vm.started
        assert c.hello is not None
        hello = c.hello
    await stream.aclose()
    return vm, hello_s, hello


async def bench_vm(args: argparse.Namespace, workroot: Path) -> None:
    print(f"VM: minimal image, TCG, 1 vCPU, 256 MiB, {os.cpu_count()} host cores, "
          f"load {os.getloadavg()[0]:.2f}")
    boots = []
    vm: EngineVM | None = None
    stack = contextlib.ExitStack()
    try:
        for i in range(args.boots):
            await anyio.to_thread.run_sync(stack.close)  # the previous VM
            stack = contextlib.ExitStack()
            vm, secs, hello = await boot_once(stack)
            boots.append(secs)
            b = hello.boot
            print(f"  boot {i + 1}: QEMU start -> hello {secs:.2f} s "
                  f"(guest uptime: init {b.init_t0}, agent start {b.agent_start:.2f}, "
                  f"listening {b.listen:.2f}, hello {b.hello:.2f})")
        FIGURES["boot_to_hello"] = statistics.median(boots)
        FIGURES["boot_to_hello_all"] = boots
        FIGURES["guest_init_to_agent_start"] = b.agent_start - (b.init_t0 or 0.0)
        print(f"  QEMU start -> agent hello: median {statistics.median(boots):.2f} s, "
              f"best {min(boots):.2f} s (target <= 3.5 s)")
        assert vm is not None
        sock = await anyio.to_thread.run_sync(vm.connect_channel, 30.0)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        async with GuestClient.connect(stream, hello_timeout=60) as c:
            report_latency("ping round trip (virtio-serial)", await ping_round_trips(c, 200),
                           "ping")
            report_latency("exec `true` round trip (virtio-serial)",
                           await exec_round_trips(c, args.execs), "exec")
            print("    (target p50 <= 30 ms)")
            up, down = await transfer(c, args.mib, "/root/bench.bin", workroot)
            print(f"  file transfer {args.mib} MiB: host->guest {up:.1f} MiB/s, "
                  f"guest->host {down:.1f} MiB/s")
            FIGURES.update(upload_mib_s=up, download_mib_s=down, transfer_mib=args.mib)
        await stream.aclose()
    finally:
        await anyio.to_thread.run_sync(stack.close)


async def bench_socketpair(args: argparse.Namespace, workroot: Path) -> None:
    from agentiso.guest.agent import Agent
    from agentiso.guest.channel import FdChannel

    print("In-process agent over a socketpair (no VM; baseline):")
    ours, theirs = socket.socketpair()
    agent = Agent(pid1=False)
    agent.start()
    chan = FdChannel(theirs.detach(), "socketpair", resyncable=True)
    stream = await anyio.abc.SocketStream.from_socket(ours)
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.serve, chan)
        async with GuestClient.connect(stream) as c:
            report_latency("exec `true` round trip (socketpair)",
                           await exec_round_trips(c, args.execs))
            up, down = await transfer(c, args.mib, str(workroot / "sp.bin"), workroot)
            print(f"  file transfer {args.mib} MiB: host->agent {up:.1f} MiB/s, "
                  f"agent->host {down:.1f} MiB/s")
        await stream.aclose()
        tg.cancel_scope.cancel()
    agent.close()
    os.close(chan.fd)


async def amain(args: argparse.Namespace) -> int:
    log.configure("warning")  # the engine's own log to stderr, and only its warnings
    workroot = Path(tempfile.mkdtemp(prefix="guest-bench-", dir=REPO / "build"))
    try:
        reason = unusable_reason(image_dir("minimal"))
        if reason is None and os.geteuid() != 0:
            reason = "needs root"
        if reason is None:
            await bench_vm(args, workroot)
        else:
            print(f"VM benchmarks skipped: {reason}")
        await bench_socketpair(args, workroot)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    report.record("guest", FIGURES)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--boots", type=int, default=3, help="VM boots to time")
    p.add_argument("--execs", type=int, default=200, help="exec round trips to time")
    p.add_argument("--mib", type=int, default=64, help="file size for the transfer rates")
    return anyio.run(amain, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
