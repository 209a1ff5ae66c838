"""Where a cold boot's time goes between the guest's init and the agent's hello.

Boots the ``minimal`` image through the real VM engine with
``PYTHONPROFILEIMPORTTIME=1`` on the kernel command line (the kernel hands
unknown ``KEY=VALUE`` parameters to init as environment, and agentiso-init
passes its environment to python), then reads the console: the agent's boot
timings from its hello and Python's ``-X importtime`` lines, summed per
top-level module, slowest first.

Run: ``.venv/bin/python -m bench.boot_profile [--top N]`` (root, ``make image``).
Not part of ``make bench`` (the profile itself slows the boot); a tool to find
what to cut.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import anyio.abc

from agentiso.frontend.guest_client import GuestClient
from agentiso.privhelper import log
from tests.harness.engine import engine_vm
from tests.harness.images import image_dir

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(console: str) -> list[tuple[str, int, int, int]]:
    """(module, self us, cumulative us, depth) for each ``-X importtime`` line."""
    out = []
    for m in LINE.finditer(console):
        out.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    return out


async def boot_and_profile(top: int, dump: str | None) -> int:
    log.configure("warning")
    with engine_vm("minimal", cmdline=_cmdline() + " PYTHONPROFILEIMPORTTIME=1") as vm:
        sock = await anyio.to_thread.run_sync(vm.connect_channel, 60.0)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        async with GuestClient.connect(stream, hello_timeout=180) as c:
            hello_s = time.monotonic() - vm.started
            assert c.hello is not None
            b = c.hello.boot
        await stream.aclose()
        console = await anyio.to_thread.run_sync(vm.console_text)
    if dump:
        await anyio.Path(dump).write_text(console)
    rows = parse_importtime(console)
    print(f"QEMU start -> hello {hello_s:.2f} s; guest uptime: init {b.init_t0}, "
          f"agent start {b.agent_start:.2f}, listening {b.listen:.2f}, hello {b.hello:.2f}")
    tops = [r for r in rows if r[3] == 0]
    total = sum(r[2] for r in tops)
    print(f"imports (profiled, so slower than a real boot): {len(rows)} modules, "
          f"{total / 1e6:.2f} s at top level")
    for name, _self, cum, _ in sorted(tops, key=lambda r: -r[2])[:top]:
        print(f"  {cum / 1000:8.1f} ms  {name}")
    print("slowest by own time:")
    for name, own, _cum, depth in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"  {own / 1000:8.1f} ms  {'  ' * depth}{name}")
    return 0


def _cmdline() -> str:
    return str(json.loads((image_dir("minimal") / "manifest.json").read_text())["cmdline"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--console", metavar="FILE", help="also write the whole console here")
    args = p.parse_args(argv)
    return anyio.run(boot_and_profile, args.top, args.console)


if __name__ == "__main__":
    sys.exit(main())
