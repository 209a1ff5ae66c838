"""The VM engine against real QEMU (TCG) and the real `minimal` guest image.

Every QEMU here runs as a per-VM unprivileged uid (asserted from /proc), with
the full seccomp sandbox, its disk passed as fds.  Each test creates its own
temporary state/run directories and kills + forgets every VM it started, even
on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest

from agentiso.frontend.guest_client import GuestClient
from agentiso.privhelper.vm.engine import (
    EngineSettings,
    VmConfig,
    VmEngine,
    VmState,
)
from agentiso.privhelper.vm.errors import (
    InvalidVmSpec,
    LaunchError,
    VmAlreadyExists,
    VmError,
    VmStateConflict,
    VmUnavailable,
)
from agentiso.privhelper.vm.procfs import parse_status_groups, parse_status_ids, read_status
from agentiso.privhelper.vm.record import live_pids
from agentiso.privhelper.vm.spec import DiskLayer
from tests.harness.images import image_dir, pin_image, require_image

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 90.0  # TCG on 2 shared cores: a boot takes 3 s idle, far more under load
SECRET = b"s3cr3t-" + secrets.token_hex(16).encode()
SECRET_IN_GUEST = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.agentiso/secret/raw"


@dataclass
class Env:
    base: Path
    settings: EngineSettings
    cmdline: str
    prefix: str
    image: Path

    def overlay(self, name: str) -> Path:
        """A fresh qcow2 overlay over the image's rootfs (the VM's writable disk)."""
        path = self.base / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
             "-b", str(self.image / "rootfs.img"), str(path)],
            check=True,
        )  # fmt: skip
        return path

    def config(self, name: str, disk: Path | None = None, **kw: object) -> VmConfig:
        disk = disk or self.overlay(name)
        return VmConfig(
            name=name,
            kernel=str(self.image / "vmlinuz"),
            initrd=str(self.image / "initrd.img"),
            cmdline=self.cmdline,
            disks=(
                DiskLayer(format="qcow2", path=str(disk)),
                DiskLayer(format="raw", path=str(self.image / "rootfs.img"), read_only=True),
            ),
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture
def env() -> Iterator[Env]:
    require_image("minimal")
    # Short (socket paths <= 107 bytes) and traversable by the VMs' uids.
    base = Path(tempfile.mkdtemp(prefix="agvm", dir="/tmp"))
    os.chmod(base, 0o711)
    prefix = "t" + secrets.token_hex(3)
    settings = EngineSettings(
        state_dir=str(base / "state"), run_dir=str(base / "run"), accel="auto"
    )
    try:
        info = pin_image(image_dir("minimal"), base / "image")
        yield Env(base, settings, info.cmdline, prefix, info.dir)
    finally:
        _kill_leftovers(base)
        shutil.rmtree(base, ignore_errors=True)


def _kill_leftovers(base: Path) -> None:
    """Kill any QEMU an engine recorded under this test's state dir that still
    runs (by pid, checked to be the same process).  QEMU's argv names no path of
    ours (the engine passes fds), so the records are what tells."""
    for pid in live_pids(base / "state" / "vm" / "records"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def engine_for(env: Env) -> AsyncIterator[VmEngine]:
    async with VmEngine.running(env.settings) as engine:
        try:
            yield engine
        finally:
            with anyio.CancelScope(shield=True):
                for name in engine.names():
                    with contextlib.suppress(VmError):
                        await engine.kill(name)
                        engine.forget(name)


def _owner_and_mode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_uid, st.st_mode & 0o7777


def _exists(p: Path) -> bool:
    return p.exists()


def _read(p: Path) -> bytes:
    return p.read_bytes()


def _has_vhost_vsock() -> bool:
    return os.path.exists("/dev/vhost-vsock")


def _has_kvm() -> bool:
    return os.path.exists("/dev/kvm")


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)


def assert_unprivileged(pid: int) -> None:
    text = read_status(pid)
    assert text is not None, "QEMU is gone"
    uids = parse_status_ids(text, "Uid")
    gids = parse_status_ids(text, "Gid")
    assert 0 not in uids, f"QEMU runs with a root uid: {uids}"
    assert 0 not in gids, f"QEMU runs with a root gid: {gids}"
    assert parse_status_groups(text) == []
    assert "Seccomp:\t2" in text  # the -sandbox filter is installed


async def wait_console(engine: VmEngine, name: str, needle: bytes, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while needle not in engine.console_tail(name, 64 * 1024):
            await anyio.sleep(0.1)


@contextlib.asynccontextmanager
async def guest(engine: VmEngine, name: str) -> AsyncIterator[GuestClient]:
    stream = await anyio.connect_unix(engine.channel_socket(name))
    try:
        async with stream, GuestClient.connect(stream, hello_timeout=BOOT_TIMEOUT) as client:
            yield client
    except BaseException:
        # The guest's side of the story, for whoever reads the failure.
        print(engine.console_tail(name, 8192).decode(errors="replace"))
        raise


# --- tests ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_start_agent_hello_exec_memory_snapshot_and_graceful_stop(env: Env) -> None:
    a, b = f"{env.prefix}-a", f"{env.prefix}-b"
    disk = env.overlay(a)
    async with engine_for(env) as engine:
        t0 = time.monotonic()
        st = await engine.start(env.config(a, disk=disk, secret=SECRET))
        assert st.state is VmState.RUNNING
        assert_unprivileged(st.pid)
        # The secret reached fw_cfg through a file that is gone once QEMU read it,
        # and never appeared in QEMU's (world-readable) argv.
        assert not _exists(Path(env.settings.run_dir) / a / "secret")
        assert SECRET not in _read(Path(f"/proc/{st.pid}/cmdline"))
        # QEMU owns nothing on the host's file system: its sockets are the
        # helper's (root-only directory), passed to it as listening fds.
        assert _owner_and_mode(Path(env.settings.run_dir) / a) == (0, 0o700)
        for sock in ("qmp.sock", "console.sock", "agent.sock"):
            assert _owner_and_mode(Path(env.settings.run_dir) / a / sock) == (0, 0o600)
        assert os.readlink(f"/proc/{st.pid}/cwd") == "/"
        assert await engine.query_status(a) == "running"
        async with guest(engine, a) as g:
            hello = g.hello
            assert hello is not None and hello.transport == "virtio-serial" and hello.pid1
            print(f"start -> agent hello: {time.monotonic() - t0:.2f}s")
            out = await g.exec(["sh", "-c", "echo hi; id -u"])
            assert out.ok and out.stdout.startswith(b"hi\n")
            fw = await g.exec(
                ["sh", "-c", f"modprobe qemu_fw_cfg 2>/dev/null; cat {SECRET_IN_GUEST}"]
            )
            assert fw.ok and fw.stdout == SECRET, fw
            job = await g.job_start(["sleep", "1000"])
            await g.write_file("/root/marker", b"before-snapshot")
        await wait_console(engine, a, b"agentiso-init", 5)

        mem = env.base / "a.mem"
        fd = os.open(mem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            saved = await engine.save_memory(a, fd)
        finally:
            os.close(fd)
        assert saved.bytes_written > 1024 * 1024
        print(f"memory save: {saved.seconds:.2f}s, {saved.bytes_written / 2**20:.0f} MiB")
        assert engine.status(a).state is VmState.PAUSED
        await engine.kill(a)
        engine.forget(a)

        fd = os.open(mem, os.O_RDONLY)
        try:
            t1 = time.monotonic()
            st_b = await engine.start(env.config(b, disk=disk, incoming_fd=fd, secret=SECRET))
            print(f"memory restore: {time.monotonic() - t1:.2f}s")
        finally:
            os.close(fd)
        assert st_b.state is VmState.RUNNING
        assert_unprivileged(st_b.pid)
        async with guest(engine, b) as g:
            assert g.hello is not None
            # Same agent process, same boot: not a reboot.
            before, after = hello.boot, g.hello.boot
            assert (after.init_t0, after.agent_start) == (before.init_t0, before.agent_start)
            assert g.hello.session > hello.session
            jobs = {j.job: j for j in await g.job_list()}
            assert jobs[job.job].running and jobs[job.job].pid == job.pid
            alive = await g.exec(["kill", "-0", str(job.pid)])
            assert alive.ok
            assert (await g.read_file("/root/marker")).data == b"before-snapshot"

            async def agent_shutdown() -> None:
                await g.shutdown()

            stopped = await engine.stop(b, agent_shutdown=agent_shutdown, agent_timeout=60)
        assert stopped.state is VmState.STOPPED
        assert stopped.exit_reason is not None and "agent shutdown" in stopped.exit_reason
        engine.forget(b)
        assert not (Path(env.settings.run_dir) / b).exists()


@pytest.mark.anyio
async def test_kill_9_of_qemu_is_a_crash_seen_within_a_second(env: Env) -> None:
    name = f"{env.prefix}-c"
    async with engine_for(env) as engine:
        events = engine.subscribe()
        st = await engine.start(env.config(name))
        assert_unprivileged(st.pid)
        await wait_console(engine, name, b"agentiso-init", BOOT_TIMEOUT)  # something to show
        os.kill(st.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with anyio.fail_after(5):
            event = await events.receive()
        seen = time.monotonic() - t0
        print(f"crash detected in {seen * 1000:.0f} ms")
        assert seen < 1.0
        assert event.name == name and event.state is VmState.CRASHED
        status = engine.status(name)
        assert status.state is VmState.CRASHED
        assert status.exit_reason is not None and "SIGKILL" in status.exit_reason
        assert status.console_tail and "agentiso-init" in status.console_tail
        with pytest.raises(VmStateConflict):
            await engine.qmp(name, "query-status")


@pytest.mark.anyio
async def test_forced_stop_and_stop_without_agent(env: Env) -> None:
    n1, n2 = f"{env.prefix}-k", f"{env.prefix}-q"
    async with engine_for(env) as engine:
        s1 = await engine.start(env.config(n1))
        s2 = await engine.start(env.config(n2))
        # A QMP connection lost while QEMU lives: the failing call says so, the
        # next one reconnects (reaching into the engine to cut the connection).
        qmp = engine._vms[n2]._qmp
        assert qmp is not None
        await qmp.close()
        with pytest.raises(VmUnavailable):
            await engine.query_status(n2)
        assert await engine.query_status(n2) == "running"
        # A memory save takes the same path: cut again, it fails once, the
        # next one reconnects and saves.
        qmp = engine._vms[n2]._qmp
        assert qmp is not None
        await qmp.close()
        fd = os.open(env.base / "q.mem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with pytest.raises(VmUnavailable):
                await engine.save_memory(n2, fd)
            saved = await engine.save_memory(n2, fd)
        finally:
            os.close(fd)
        assert saved.bytes_written > 1024 * 1024
        await engine.resume(n2)
        assert await engine.query_status(n2) == "running"
        killed = await engine.kill(n1)
        assert killed.state is VmState.STOPPED and "SIGKILL" in (killed.exit_reason or "")
        # No agent hook: ACPI powerdown (our guest has no handler) then QMP quit.
        stopped = await engine.stop(n2, powerdown_timeout=1)
        assert stopped.state is VmState.STOPPED
        assert "exited with status 0 after QMP quit" in (stopped.exit_reason or "")
        for pid in (s1.pid, s2.pid):
            assert read_status(pid) is None or "State:\tZ" in (read_status(pid) or "")


@pytest.mark.anyio
async def test_bad_start_is_refused_and_leaves_nothing(env: Env) -> None:
    name = f"{env.prefix}-x"
    async with engine_for(env) as engine:
        cfg = env.config(name)
        bad_disk = VmConfig(
            name=name,
            kernel=cfg.kernel,
            initrd=cfg.initrd,
            cmdline=cfg.cmdline,
            disks=(DiskLayer(format="qcow2", path=str(env.base / "missing.qcow2")),),
        )
        with pytest.raises(InvalidVmSpec):
            await engine.start(bad_disk)
        with pytest.raises(InvalidVmSpec):
            await engine.start(VmConfig(name="Bad/Name", kernel="/k", cmdline="", disks=()))
        # The helper opens the kernel for QEMU: a missing one is refused before
        # QEMU starts (one in a directory QEMU's uid cannot reach is fine).
        with pytest.raises(InvalidVmSpec, match="cannot open"):
            await engine.start(
                VmConfig(name=name, kernel=str(env.base / "no-such-kernel"), cmdline="",
                         disks=cfg.disks)
            )
        # QEMU itself refuses (a directory is no kernel): its stderr is in the error.
        junk = env.base / "not-a-kernel"
        junk.mkdir(mode=0o755)
        with pytest.raises(LaunchError, match=r"QEMU said: .*kernel"):
            await engine.start(VmConfig(name=name, kernel=str(junk), cmdline="", disks=cfg.disks))
        assert engine.names() == []
        assert not (Path(env.settings.run_dir) / name).exists()
        assert not (Path(env.settings.state_dir) / "vm" / "logs" / name).exists()
        assert not list((Path(env.settings.state_dir) / "vm" / "records").iterdir())


@pytest.mark.anyio
async def test_accelerator_probe_decides_once_and_fast(env: Env) -> None:
    async with engine_for(env) as engine:
        t0 = time.monotonic()
        d = await engine.probe_accelerator(str(env.image / "vmlinuz"))
        took = time.monotonic() - t0
        print(f"accelerator: {d.kind} ({d.reason}) in {took:.2f}s")
        assert took < env.settings.probe_timeout_s + 3
        if not _has_kvm():
            assert d.kind == "tcg"
        t1 = time.monotonic()
        assert await engine.probe_accelerator(str(env.image / "vmlinuz")) is d  # cached
        # Not probed again (a probe boots QEMU: seconds); the margin holds under load.
        assert time.monotonic() - t1 < 0.5
        checks = {c.name: c for c in await engine.check(str(env.image / "vmlinuz"))}
        assert checks["qemu"].ok and checks["unprivileged-qemu"].ok and checks["run-dir"].ok
        assert checks["accelerator"].detail.startswith(d.kind)


@pytest.mark.anyio
async def test_kvm_boot_test_on_this_host(env: Env) -> None:
    """What a stock kernel does under this host's /dev/kvm, found by a real boot.

    /dev/kvm is root-only here, so the engine's probe never gets to a boot: an
    unprivileged QEMU could not open it.  This runs the boot test itself under
    a throwaway unprivileged uid only if /dev/kvm is open to it.
    """
    from agentiso.privhelper.vm.accel import kvm_access, kvm_boot_test

    if not _has_kvm():
        pytest.skip(reason="no /dev/kvm on this host")
    st = os.stat("/dev/kvm")
    usable, gid, why = kvm_access(st.st_mode, st.st_gid)
    if not usable:
        pytest.skip(reason=f"boot test impossible unprivileged: {why}")
    uid = env.settings.uid_base + env.settings.uid_count - 1
    kernel = str(env.image / "vmlinuz")
    ok, detail = await kvm_boot_test("qemu-system-x86_64", kernel, uid, gid or uid, 5.0)
    print(f"kvm boot test: {ok} {detail}")
    # The verdict says what it saw: the end of kernel start-up, or the last line.
    assert detail.startswith("a test boot under KVM"), detail
    if ok:
        assert "reached the end of kernel start-up" in detail
    else:
        assert "did not complete within 5s (last: " in detail
    # The engine (accel "auto", the same uid) decides as the boot test found.
    async with engine_for(env) as engine:
        decision = await engine.probe_accelerator(kernel)
    assert decision.kind == ("kvm" if ok else "tcg"), decision


# --- adoption after kill -9 of the engine's process -------------------------------------

CHILD = """
import json, sys, anyio
from agentiso.privhelper.vm.engine import EngineSettings, VmEngine, VmConfig
import msgspec
from agentiso.privhelper import log

async def main():
    log.configure()  # logs on stderr: stdout carries only our JSON line
    settings = msgspec.json.decode(sys.argv[1].encode(), type=EngineSettings)
    cfg = msgspec.json.decode(sys.argv[2].encode(), type=VmConfig)
    async with VmEngine.running(settings) as engine:
        st = await engine.start(cfg)
        print(json.dumps({"pid": st.pid}), flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.mark.anyio
async def test_engine_killed_vm_survives_and_is_adopted(env: Env) -> None:
    name = f"{env.prefix}-d"
    cfg = env.config(name)
    child = _spawn(
        [sys.executable, "-c", CHILD,
         msgspec.json.encode(env.settings).decode(), msgspec.json.encode(cfg).decode()],
    )  # fmt: skip
    try:
        assert child.stdout is not None
        with anyio.fail_after(BOOT_TIMEOUT):
            line = await anyio.to_thread.run_sync(child.stdout.readline)
        qemu_pid = json.loads(line)["pid"]
    finally:
        child.kill()  # kill -9 of the process running the engine
        child.wait()
    assert read_status(qemu_pid) is not None, "QEMU died with its engine"
    assert_unprivileged(qemu_pid)

    # Not engine_for: its clean-up would forget the record checked below.
    async with VmEngine.running(env.settings) as engine:
        # Starting over a record not yet adopted would clobber a live VM.
        with pytest.raises(VmAlreadyExists):
            await engine.start(cfg)
        report = await engine.adopt_all()
        assert report.adopted == [name] and report.dead == []
        st = engine.status(name)
        assert st.adopted and st.pid == qemu_pid and st.state is VmState.RUNNING
        assert await engine.query_status(name) == "running"
        async with guest(engine, name) as g:
            assert (await g.exec(["true"])).ok
            # The console keeps flowing into the log through the new engine.
            await g.exec(["sh", "-c", "echo ADOPTED-CONSOLE > /dev/console"])
        await wait_console(engine, name, b"ADOPTED-CONSOLE", 10)
        # Other QEMUs of this host (other tests, other helpers) may be listed too.
        assert [o for o in engine.find_orphans() if o.name.startswith(env.prefix)] == []
        # The adopted QEMU is not our child: its death is still seen (pidfd).
        events = engine.subscribe()
        os.kill(qemu_pid, signal.SIGKILL)
        with anyio.fail_after(2):
            ev = await events.receive()
        assert ev.state is VmState.CRASHED

    # A record whose QEMU is gone is reported dead by the next engine.
    async with engine_for(env) as engine:
        report = await engine.adopt_all()
        assert report.adopted == [] and [d.name for d in report.dead] == [name]
        assert engine.status(name).state is VmState.CRASHED


@pytest.mark.anyio
async def test_orphan_qemu_is_found_and_killed(env: Env) -> None:
    name = f"{env.prefix}-o"
    async with VmEngine.running(env.settings) as engine:
        st = await engine.start(env.config(name))
    # The engine context is gone (VM left running, detached); a new engine that
    # does not adopt sees an orphan.  Delete the record to simulate an unknown QEMU.
    (Path(env.settings.state_dir) / "vm" / "records" / f"{name}.json").unlink()
    async with engine_for(env) as engine:
        orphans = [o for o in engine.find_orphans() if o.name == name]
        assert [o.pid for o in orphans] == [st.pid]
        assert orphans[0].uid == st.uid
        assert engine.kill_orphan(orphans[0])
        with anyio.fail_after(5):
            while read_status(st.pid) is not None and "State:\tZ" not in (
                read_status(st.pid) or ""
            ):
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_tap_fd_passed_to_unprivileged_qemu_carries_traffic(env: Env) -> None:
    """The helper opens the TAP (in a namespace this test owns) and QEMU only gets the fd."""
    from agentiso.privhelper.net.tap import open_tap
    from agentiso.privhelper.vm.spec import NetAttachment
    from tests.harness.netns import NetnsUnavailable, check_available, netns

    name = f"{env.prefix}-n"
    mac = "52:54:00:4d:00:02"
    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(reason=f"network namespaces unavailable: {e}")
    with netns("agvm") as ns:
        with ns.entered():
            tap_fd = open_tap("tap0", vnet_hdr=True)
        try:
            ns.ip("addr", "add", "192.168.77.1/24", "dev", "tap0")
            ns.ip("link", "set", "tap0", "up")
            async with engine_for(env) as engine:
                st = await engine.start(env.config(name, net=NetAttachment(tap_fd=tap_fd, mac=mac)))
                os.close(tap_fd)  # QEMU holds its own copy now
                tap_fd = -1
                assert_unprivileged(st.pid)
                async with guest(engine, name) as g:
                    await g.configure_network(address="192.168.77.2", prefix=24, mac=mac)
                    link = await g.exec(["ip", "-o", "link", "show"])
                    assert mac.encode() in link.stdout
                probe = await anyio.to_thread.run_sync(
                    lambda: ns.probe("ping", "192.168.77.2", "10")
                )
                assert probe.returncode == 0, probe.stderr
        finally:
            if tap_fd >= 0:
                os.close(tap_fd)


@pytest.mark.anyio
async def test_live_disk_snapshot_switches_qemu_to_a_new_overlay(env: Env) -> None:
    """The qcow2 live snapshot path: QEMU moves to a new top layer it gets as an fd."""
    name, early, late = f"{env.prefix}-s", f"{env.prefix}-e", f"{env.prefix}-l"
    a = env.overlay(name)

    def overlay_on(parent: Path, child: Path) -> Path:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(parent),
             str(child)],
            check=True,
        )  # fmt: skip
        return child

    def chain(*tops: Path) -> tuple[DiskLayer, ...]:
        layers = [
            DiskLayer(format="qcow2", path=str(p), read_only=i > 0) for i, p in enumerate(tops)
        ]
        raw = DiskLayer(format="raw", path=str(env.image / "rootfs.img"), read_only=True)
        return (*layers, raw)

    async with engine_for(env) as engine:
        await engine.start(env.config(name, disk=a))
        async with guest(engine, name) as g:
            await g.write_file("/root/f1", b"one")
            await g.sync()
            b = await anyio.to_thread.run_sync(overlay_on, a, env.base / "b.qcow2")
            await engine.pause(name)
            assert await engine.switch_to_overlay(name, str(b)) == "disk0-s1"
            await engine.resume(name)
            await g.write_file("/root/f1", b"two")
            await g.sync()
            c = await anyio.to_thread.run_sync(overlay_on, b, env.base / "c.qcow2")
            assert await engine.switch_to_overlay(name, str(c)) == "disk0-s2"
            await g.write_file("/root/f2", b"after-second")
            await g.sync()
            with pytest.raises(InvalidVmSpec):
                await engine.switch_to_overlay(name, str(env.base / "missing.qcow2"))
            nodes = await engine.qmp(name, "query-named-block-nodes", {"flat": True})
            assert {"disk0-s2", "disk0-s1", "disk0"} <= {n["node-name"] for n in nodes}
            # A memory snapshot leaves the VM paused with its disks handed off;
            # resuming must give the guest a writable disk again.
            fd = os.open(env.base / "s.mem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                await engine.save_memory(name, fd)
            finally:
                os.close(fd)
            await engine.resume(name)
            assert await engine.query_status(name) == "running"
            await g.write_file("/root/f3", b"after-memory-save")
            await g.sync()

            async def agent_shutdown() -> None:
                await g.shutdown()

            await engine.stop(name, agent_shutdown=agent_shutdown, agent_timeout=60)
        rec = engine.record(name)
        assert rec.top_node == "disk0-s2"
        assert rec.spec.disks == chain(c, b, a)
        engine.forget(name)

        # The first snapshot layer holds the disk as it was at the switch...
        await engine.start(env.config(early, disk=a))
        async with guest(engine, early) as g:
            assert (await g.read_file("/root/f1")).data == b"one"
        await engine.kill(early)
        # ... and the whole chain the latest state.
        base_cfg = env.config(late, disk=c)
        await engine.start(msgspec.structs.replace(base_cfg, disks=chain(c, b, a)))
        async with guest(engine, late) as g:
            assert (await g.read_file("/root/f1")).data == b"two"
            assert (await g.read_file("/root/f2")).data == b"after-second"
            assert (await g.read_file("/root/f3")).data == b"after-memory-save"


@pytest.mark.anyio
async def test_boot_test_machinery_under_tcg(env: Env) -> None:
    """The probe's boot test, run for real with TCG standing in for KVM.

    KVM itself cannot be booted unprivileged here (root-only /dev/kvm), so the
    machinery is exercised under TCG: spawned as a range uid with the sandbox,
    it recognises the end of kernel start-up; given too little time it kills
    QEMU and says the boot did not complete (what a hanging KVM looks like).
    """
    from agentiso.privhelper.vm.accel import kvm_boot_test
    from agentiso.privhelper.vm.procfs import read_host_tsc_khz

    uid = env.settings.uid_base + env.settings.uid_count - 1
    kernel = str(env.image / "vmlinuz")
    t0 = time.monotonic()
    ok, why = await kvm_boot_test(
        "qemu-system-x86_64", kernel, uid, uid, 60.0, accel="tcg", tsc_khz=read_host_tsc_khz()
    )
    print(f"TCG boot test: {ok} in {time.monotonic() - t0:.2f}s ({why})")
    assert ok, why
    t0 = time.monotonic()
    ok, why = await kvm_boot_test("qemu-system-x86_64", kernel, uid, uid, 0.3, accel="tcg")
    assert not ok and "did not complete within 0.3s" in why
    assert time.monotonic() - t0 < 5
    assert not [o for o in _qemus_of_uid(uid)], "the boot test left a QEMU behind"


def _qemus_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        text = read_status(int(entry.name)) if entry.name.isdigit() else None
        if (
            text
            and "qemu" in text.split("\n", 1)[0]
            and parse_status_ids(text, "Uid")[0] == uid
            and "State:\tZ" not in text
        ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.anyio
async def test_vsock_channel_needs_a_secret_and_the_device(env: Env) -> None:
    name = f"{env.prefix}-v"
    async with engine_for(env) as engine:
        with pytest.raises(InvalidVmSpec, match="secret"):
            await engine.start(env.config(name, channel="vsock", guest_cid=77))
        with pytest.raises(InvalidVmSpec, match="CID"):
            await engine.start(env.config(name, channel="vsock", secret=SECRET))
        if _has_vhost_vsock():
            pytest.skip(reason="this host has /dev/vhost-vsock; the refusal path is not reachable")
        with pytest.raises(VmUnavailable, match="vhost-vsock"):
            await engine.start(env.config(name, channel="vsock", guest_cid=77, secret=SECRET))
        assert engine.names() == []
        assert not _exists(Path(env.settings.run_dir) / name)


@pytest.mark.anyio
async def test_stop_skips_a_failing_agent_hook_and_a_paused_guest(env: Env) -> None:
    n1, n2 = f"{env.prefix}-h", f"{env.prefix}-p"
    async with engine_for(env) as engine:
        await engine.start(env.config(n1))
        await engine.start(env.config(n2))

        async def no_channel() -> None:
            raise RuntimeError("no guest channel")

        t0 = time.monotonic()
        st = await engine.stop(n1, agent_shutdown=no_channel, agent_timeout=30, powerdown_timeout=1)
        assert time.monotonic() - t0 < 10  # not the agent's 30 s
        assert st.state is VmState.STOPPED and "QMP quit" in (st.exit_reason or "")
        await engine.pause(n2)
        t0 = time.monotonic()
        st = await engine.stop(
            n2, agent_shutdown=no_channel, agent_timeout=30, powerdown_timeout=30
        )
        assert time.monotonic() - t0 < 5  # paused: straight to QMP quit
        assert st.state is VmState.STOPPED and "QMP quit" in (st.exit_reason or "")


@pytest.mark.anyio
async def test_adopt_while_qmp_is_busy_then_reconnect(env: Env) -> None:
    """QEMU serves one QMP client: adoption copes when another one holds it."""
    name = f"{env.prefix}-b"
    async with VmEngine.running(env.settings) as engine:
        st = await engine.start(env.config(name))
    # The first engine is gone (VM left running).  Someone else grabs QMP.
    squatter = await anyio.connect_unix(str(Path(env.settings.run_dir) / name / "qmp.sock"))
    try:
        quick = msgspec.structs.replace(env.settings, qmp_timeout_s=1.0)
        async with VmEngine.running(quick) as engine:
            try:
                report = await engine.adopt_all()
                assert report.adopted == [name]
                assert engine.status(name).state is VmState.RUNNING
                await squatter.aclose()
                assert await engine.query_status(name) == "running"  # reconnected
                # A guest-initiated power-off of an adopted QEMU (not our child, no
                # exit status) is a stop, told apart from a crash by QMP's SHUTDOWN.
                events = engine.subscribe()
                async with guest(engine, name) as g:
                    await g.shutdown()
                with anyio.fail_after(30):
                    ev = await events.receive()
                assert ev.state is VmState.STOPPED, ev
            finally:
                with anyio.CancelScope(shield=True):
                    await engine.kill(name)
                    engine.forget(name)
    finally:
        await squatter.aclose()
    assert read_status(st.pid) is None or "State:\tZ" in (read_status(st.pid) or "")
