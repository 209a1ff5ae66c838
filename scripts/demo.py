"""``make demo``: a real workspace session, end to end, printing what happens.

It starts a private ``agentiso-helper`` (its own state directory, socket and
network namespace, so nothing on this host's network changes), then drives it
with the same client code the MCP frontend uses:

create a workspace from the guest image, run commands, write and read a file,
snapshot it while it runs, change the file, restore the snapshot, fork the
snapshot into a second workspace, destroy everything.

Run as root after ``make image``; everything it made is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from agentiso.frontend.guest_channel import open_guest
from agentiso.frontend.helper_client import HelperClient, connect_helper
from agentiso.privhelper.vm.record import live_pids
from agentiso.protocol import helper as hp

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "build" / "images"


def say(text: str) -> None:
    print(text, flush=True)


def step(text: str) -> float:
    print(f"\n==> {text}", flush=True)
    return time.monotonic()


def done(t0: float, extra: str = "") -> None:
    print(f"    ok ({time.monotonic() - t0:.2f} s){'  ' + extra if extra else ''}", flush=True)


@contextmanager
def private_helper() -> Iterator[Path]:
    """A helper of our own: temp state, temp socket, its own network namespace."""
    work = Path(tempfile.mkdtemp(prefix="agentiso-demo-"))
    work.chmod(0o755)
    netns = f"agentiso-demo-{os.getpid()}"
    config = work / "helper.toml"
    config.write_text(f'[vm]\nrun_dir = "{work}/run"\n')
    sock = work / "helper.sock"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    log = open(work / "helper.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "agentiso.privhelper.cli",
         "serve", "--config", str(config), "--socket", str(sock), "--group", "0",
         "--state-dir", str(work / "state"), "--images-dir", str(IMAGES)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is not None or not sock.exists():
            raise SystemExit(f"the helper did not start:\n{(work / 'helper.log').read_text()}")
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _kill_leftover_qemus(work)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _kill_leftover_qemus(work: Path) -> None:
    """If the session failed half-way, end the VMs our helper started (by pid)."""
    for pid in live_pids(work / "state" / "vm" / "records"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def sh(sock: Path, vm: str, cmd: str) -> str:
    async with open_guest(str(sock), vm) as g:
        r = await g.exec(shell=cmd)
        return " | ".join((r.stdout + r.stderr).decode(errors="replace").strip().splitlines())


async def session(sock: Path) -> None:
    async with connect_helper(str(sock), client_name="agentiso-demo") as helper:
        await run(helper, sock)


async def run(helper: HelperClient, sock: Path) -> None:
    t_all = time.monotonic()
    assert helper.hello is not None
    say(f"helper: {helper.hello.server}")

    t = step("create a workspace disk from the 'minimal' guest image (copy-on-write)")
    await helper.request(hp.VolumeCreate(id=0, name="demo", source=hp.FromImage(image="minimal")))
    done(t)

    t = step("boot it: a QEMU microVM as its own unprivileged uid, with its own network")
    vm = await helper.call(hp.VmStart(id=0, name="demo", volume="demo"), hp.VmInfo, timeout=180)
    net = vm.network
    done(t, f"accel={vm.accel} address={net.address if net else '-'}")

    t = step("run commands in it")
    say("    $ uname -srm   -> " + await sh(sock, "demo", "uname -srm"))
    say("    $ hostname     -> " + await sh(sock, "demo", "hostname"))
    say("    $ id -un       -> " + await sh(sock, "demo", "id -un"))
    done(t)

    t = step("write a file, read it back")
    async with open_guest(str(sock), "demo") as g:
        await g.write_file("/root/notes.txt", b"version 1: written before the snapshot\n")
        data = await g.read_file("/root/notes.txt")
    say("    /root/notes.txt: " + data.data.decode().strip())
    done(t)

    t = step("snapshot the running workspace (the guest freezes its filesystem for it)")
    await helper.request(hp.SnapshotCreate(id=0, volume="demo", snapshot="v1"), timeout=120)
    done(t)

    t = step("change the file after the snapshot")
    say("    " + await sh(sock, "demo",
                          "echo 'version 2: written after' > /root/notes.txt; cat /root/notes.txt"))
    done(t)

    t = step("fork the snapshot into a second workspace, while the first runs")
    await helper.request(hp.VolumeCreate(
        id=0, name="demo-fork", source=hp.FromSnapshot(volume="demo", snapshot="v1")))
    await helper.call(hp.VmStart(id=0, name="fork", volume="demo-fork"), hp.VmInfo, timeout=180)
    say("    fork:     " + await sh(sock, "fork", "hostname; cat /root/notes.txt"))
    say("    original: " + await sh(sock, "demo", "hostname; cat /root/notes.txt"))
    done(t)

    t = step("restore the original to its snapshot (stop, roll back, boot)")
    await helper.request(hp.VmStop(id=0, name="demo"), timeout=120)
    await helper.request(hp.SnapshotRollback(id=0, volume="demo", snapshot="v1"))
    await helper.call(hp.VmStart(id=0, name="demo", volume="demo"), hp.VmInfo, timeout=180)
    say("    original: " + await sh(sock, "demo", "cat /root/notes.txt"))
    done(t)

    t = step("destroy everything")
    for name in ("demo", "fork"):
        await helper.request(hp.VmStop(id=0, name=name), timeout=120)
    await helper.request(hp.VolumeDestroy(id=0, name="demo-fork"))
    await helper.request(hp.SnapshotDelete(id=0, volume="demo", snapshot="v1"))
    await helper.request(hp.VolumeDestroy(id=0, name="demo"))
    left = await helper.call(hp.VolumeList(id=0), hp.Volumes)
    done(t, f"volumes left: {len(left.volumes)}")
    say(f"\nthe whole session took {time.monotonic() - t_all:.1f} s")


def main() -> int:
    if os.geteuid() != 0:
        say("make demo needs root: it starts the agentiso helper (QEMU, TAP, nftables).")
        return 2
    if not (IMAGES / "minimal" / "rootfs.img").exists():
        say("the guest image is missing: run 'make image' first.")
        return 2
    say("agentiso demo: a private helper in its own network namespace; nothing is left behind.")
    with private_helper() as sock:
        anyio.run(session, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
