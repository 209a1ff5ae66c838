"""``python -m tests.harness [--image NAME] [--boots N]``: boot an image, print timings.

For each boot, wall-clock seconds from spawning QEMU to: the init's first console
line, and the agent's Hello on the channel (if the image has an agent), plus the
guest's own uptimes from the Hello.  A measurement tool, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentiso.protocol import guest as gp

from .images import ImageInfo, image_dir, missing_reason
from .vm import HarnessError, boot_vm

INIT_LINE = r"agentiso-init: started at"


def one_boot(image: ImageInfo, workdir: Path, timeout: float) -> dict[str, float]:
    with boot_vm(image, workdir) as vm:
        sock = vm.connect_channel()
        decoder = gp.GuestStreamDecoder()
        sock.settimeout(0.05)
        result: dict[str, float] = {}
        deadline = vm.started + timeout
        while time.monotonic() < deadline and "hello" not in result:
            if "init" not in result and INIT_LINE in vm.console_text():
                result["init"] = time.monotonic() - vm.started
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise HarnessError(f"channel closed\n{vm.tail()}")
            for item in decoder.feed(chunk):
                if item is not None:
                    hello = gp.response_codec.decode(item)
                    if isinstance(hello, gp.Hello):
                        result["hello"] = time.monotonic() - vm.started
                        result["guest_init_uptime"] = hello.boot.init_t0 or float("nan")
                        result["guest_hello_uptime"] = hello.boot.hello
        if "init" not in result:
            result["init"] = float("nan")
        sock.close()
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness", description=__doc__)
    parser.add_argument("--image", default="minimal")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    directory = image_dir(args.image)
    reason = missing_reason(directory)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    image = ImageInfo.load(directory)
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="agentiso-boot-") as tmp:
        for i in range(args.boots):
            run = one_boot(image, Path(tmp) / str(i), args.timeout)
            runs.append(run)
            print(" ".join(f"{k}={v:.2f}s" for k, v in run.items()), flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        print(f"{key}: median {statistics.median(values):.2f}s min {min(values):.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
