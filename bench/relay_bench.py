"""Relay overhead: exec round trips through the helper's guest relay versus
straight to the agent.

1. In-process, no VM: the real agent on a unix socket; a GuestClient talks to
   it directly, then through a GuestChannel relay (socketpair to the client).
   The difference is the relay's cost per request (target <= 1 ms).
2. End to end, real VM under TCG: a private helper (in its own network
   namespace) starts a VM; exec `true` through the helper's relay.

Prints p50/p99 in milliseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from anyio.abc import ByteStream, UNIXSocketStream

from agentiso.frontend.guest_channel import open_guest
from agentiso.frontend.guest_client import GuestClient
from agentiso.privhelper.relay import GuestChannel
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient

ROUNDS = 300
REPO = Path(__file__).resolve().parents[1]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def measure(client: GuestClient, rounds: int = ROUNDS) -> list[float]:
    for _ in range(10):  # warm up
        await client.exec(["true"])
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        await client.exec(["true"])
        out.append(time.perf_counter() - t)
    return out


async def local(path: Path) -> tuple[list[float], list[float]]:
    async with await anyio.connect_unix(path) as s, GuestClient.connect(s) as direct:
        direct_times = await measure(direct)

    async def connect() -> ByteStream:
        return await anyio.connect_unix(path)

    channel = GuestChannel(name="bench", connect=connect)
    async with anyio.create_task_group() as tg:
        tg.start_soon(channel.run)
        await channel.wait_ready(20)
        a, b = socket.socketpair()
        server = await UNIXSocketStream.from_socket(a)
        client = await UNIXSocketStream.from_socket(b)

        async def receive() -> bytes:
            try:
                return await server.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b""

        tg.start_soon(channel.serve_client, receive, server.send)
        async with GuestClient.connect(client) as relayed:
            relay_times = await measure(relayed)
        await client.aclose()
        tg.cancel_scope.cancel()
    return direct_times, relay_times


def report(label: str, samples: list[float]) -> None:
    print(f"  {label:<34} p50 {pct(samples, 0.5):6.2f} ms   p99 {pct(samples, 0.99):6.2f} ms"
          f"   mean {statistics.mean(samples) * 1000:6.2f} ms")


def main() -> int:
    d = Path(tempfile.mkdtemp(prefix="agentiso-relay-bench-"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "agentiso.guest", "--unix", str(d / "agent.sock")],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if (d / "agent.sock").exists():
                break
            time.sleep(0.05)
        direct, relayed = anyio.run(local, d / "agent.sock")
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        shutil.rmtree(d, ignore_errors=True)
    print(f"exec `true`, {ROUNDS} rounds, agent as a local process (no VM):")
    report("direct to the agent", direct)
    report("through the relay", relayed)
    overhead = pct(relayed, 0.5) - pct(direct, 0.5)
    print(f"  relay overhead per exec (p50): {overhead:.2f} ms   (target <= 1 ms)")

    from tests.harness.images import image_dir, unusable_reason
    from tests.support.helper_process import IMAGES, running_helper

    reason = "needs root" if os.geteuid() != 0 else unusable_reason(image_dir("minimal"))
    if reason is not None:
        print(f"end-to-end through a VM: skipped ({reason})")
        return 0

    with running_helper(group=0, extra_args=("--images-dir", str(IMAGES))) as helper:
        with BlockingHelperClient(str(helper.socket), timeout=180) as c:
            c.request(hp.VolumeCreate(id=0, name="b", source=hp.FromImage(image="minimal")))
            t = time.perf_counter()
            c.request(hp.VmStart(id=0, name="b", volume="b"))
            start_s = time.perf_counter() - t

        async def through_vm() -> list[float]:
            async with open_guest(str(helper.socket), "b") as g:
                return await measure(g, 100)

        vm_times = anyio.run(through_vm)
        t = time.perf_counter()
        with BlockingHelperClient(str(helper.socket), timeout=180) as c:
            c.request(hp.VmStop(id=0, name="b"))
        stop_s = time.perf_counter() - t
    print("real VM (TCG) through the helper:")
    print(f"  VmStart (boot, hello, hostname, network): {start_s:.2f} s;  VmStop: {stop_s:.2f} s")
    report("exec `true` through the relay", vm_times)
    return 0



if __name__ == "__main__":
    sys.exit(main())
