"""The guest agent in a real VM: the minimal image booted under TCG by the real
VM engine (one VM for the module, :mod:`tests.harness.engine`), driven over its
virtio-serial channel by GuestClient.  Each test connects afresh, which also
exercises the agent's reconnect handling on the virtio port."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import anyio.abc
import pytest

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import NotFound
from tests.harness.engine import EngineVM, engine_vm_fixture
from tests.harness.guest import connect

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024

# A disk bigger than the image so a 100 MiB file fits (init grows the fs).
guest_vm = engine_vm_fixture("minimal", scope="module", disk_size=1024 * MiB, memory_mib=256)


async def test_hello_reports_pid1_and_boot_timings(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        h = c.hello
        assert h is not None and h.pid1 and h.transport == "virtio-serial"
        assert h.boot.init_t0 is not None
        assert h.boot.init_t0 <= h.boot.agent_start <= h.boot.listen <= h.boot.hello


async def test_exec_and_orphans_are_reaped(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        r = await c.exec(["uname", "-s"])
        assert (r.exit_code, r.stdout) == (0, b"Linux\n")
        # Orphans reparented to the agent (PID 1) must not stay zombies.
        await c.exec(shell="for i in 1 2 3 4 5; do (sleep 0.1 &) ; done")
        with anyio.fail_after(20):
            while True:
                ps = await c.exec(["ps", "-eo", "stat="])
                if b"Z" not in ps.stdout:
                    break
                await anyio.sleep(0.2)
        r = await c.exec(shell="sleep 100 & echo $!; sleep 100", timeout_s=1, stdout_cap=64)
        assert r.timed_out
        pid = r.stdout.split()[0].decode()
        # SIGKILL is sent at the timeout; the grandchild dies when it is next
        # scheduled: wait for that, not for a guess of when it happens.
        with anyio.fail_after(20):
            while not ((await c.exec(["test", "-e", f"/proc/{pid}"])).exit_code == 1
                       or b"Z" in (await c.exec(["ps", "-o", "stat=", "-p", pid])).stdout):
                await anyio.sleep(0.1)


async def test_background_job(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        j = await c.job_start(shell="for i in 1 2 3; do echo tick$i; sleep 0.2; done")
        with anyio.fail_after(30):
            while (st := await c.job_poll(j.job, wait_s=2)).info.running:
                pass
        assert st.info.exit_code == 0
        assert st.stdout.data == b"tick1\ntick2\ntick3\n"
        assert j.job in [info.job for info in await c.job_list()]
        await c.job_forget(j.job)


async def test_100_mib_round_trip(guest_vm: EngineVM, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = hashlib.sha256()
    with src.open("wb") as f:
        for _ in range(100):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    want = digest.hexdigest()
    async with connect(guest_vm) as c:
        up = await c.upload_file(src, "/root/big.bin", chunk_size=gp.MAX_CHUNK, window=8)
        assert (up.size, up.sha256) == (100 * MiB, want)
        r = await c.exec(["sha256sum", "/root/big.bin"], timeout_s=120)
        assert r.stdout.split()[0].decode() == want  # the guest's own tool agrees
        back = tmp_path / "back.bin"
        down = await c.download_file("/root/big.bin", back, chunk_size=gp.MAX_CHUNK, window=8)
        assert down.sha256 == want and back.stat().st_size == 100 * MiB
        await c.remove("/root/big.bin")
        with pytest.raises(NotFound):
            await c.stat("/root/big.bin")


async def test_files_in_the_guest(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        await c.mkdir("/root/t/deep", parents=True, exist_ok=True)
        await c.write_file("/root/t/deep/a.txt", b"hello\n", perm=0o600)
        assert (await c.read_file("/root/t/deep/a.txt")).data == b"hello\n"
        st = await c.stat("/root/t/deep/a.txt")
        assert (st.kind, st.perm, st.uid) == ("file", 0o600, 0)
        assert [e.name for e in (await c.list_dir("/root/t/deep")).entries] == ["a.txt"]
        await c.remove("/root/t", recursive=True)


async def test_hostname(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        await c.set_hostname("ws-guest-test")
        assert (await c.exec(["hostname"])).stdout == b"ws-guest-test\n"
        assert (await c.read_file("/etc/hostname")).data == b"ws-guest-test\n"
        assert b"127.0.1.1 ws-guest-test" in (await c.read_file("/etc/hosts")).data


async def test_network_configuration(guest_vm: EngineVM) -> None:
    """By MAC, with `ip` against the guest kernel.  The harness VM has no NIC
    (and the image no dummy/veth modules), so the interface found by MAC is the
    loopback device (MAC 00:00:00:00:00:00); a real NIC is covered by the
    network engineer's workspace tests."""
    async with connect(guest_vm) as c:
        await c.configure_network(mac="00:00:00:00:00:00", address="127.0.0.1", prefix=8,
                                  dns=["10.42.0.1", "fd00::1"], search=["agentiso.test"],
                                  mtu=65536 - 1)
        addr = (await c.exec(["ip", "-o", "addr", "show", "dev", "lo"])).stdout
        assert b"127.0.0.1/8" in addr
        link = (await c.exec(["ip", "-o", "link", "show", "dev", "lo"])).stdout
        assert b"mtu 65535" in link and b"UP" in link
        resolv = (await c.read_file("/etc/resolv.conf")).data
        assert b"nameserver 10.42.0.1\nnameserver fd00::1\n" in resolv
        assert b"search agentiso.test\n" in resolv
        await c.configure_network(interface="lo", address="127.0.0.1", prefix=8,
                                  gateway="127.0.0.1")
        route = (await c.exec(["ip", "route", "show", "default"])).stdout
        assert route.startswith(b"default via 127.0.0.1 dev lo")
        await c.exec(["ip", "route", "del", "default"])
        with pytest.raises(NotFound):
            await c.configure_network(mac="52:54:00:de:ad:01", address="10.0.0.2", prefix=24)
        # Loopback still carries TCP after all that.
        probe = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
                 "socket.create_connection(s.getsockname()).sendall(b'x'); "
                 "print(s.accept()[0].recv(1).decode())")
        assert (await c.exec(["python3", "-c", probe])).stdout == b"x\n"


async def test_sync_freeze_thaw(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        await c.sync()
        # A margin that holds under load: the automatic thaw must not come first.
        await c.freeze(auto_thaw_s=120)
        # While frozen, reads work; a write would block until the thaw.
        assert (await c.read_file("/etc/hostname")).data
        await c.thaw()
        await c.write_file("/root/after-thaw", b"ok")
        # The automatic thaw when no Thaw comes.
        await c.freeze(auto_thaw_s=1)
        with anyio.fail_after(30):
            await c.write_file("/root/after-auto-thaw", b"ok")
        await c.remove("/root/after-thaw")
        await c.remove("/root/after-auto-thaw")


async def test_hostile_bytes_on_the_virtio_port(guest_vm: EngineVM) -> None:
    async with connect(guest_vm) as c:
        await c.send_raw(os.urandom(100_000))
        await c.resync(timeout=30)
        assert (await c.exec(["true"])).exit_code == 0


fresh_vm = engine_vm_fixture("minimal", scope="function")


async def test_shutdown_powers_the_vm_off(fresh_vm: EngineVM) -> None:
    async with connect(fresh_vm) as c:
        await c.write_file("/root/before-shutdown", b"synced")
        await c.shutdown()
    deadline = anyio.current_time() + 60
    while fresh_vm.alive():
        assert anyio.current_time() < deadline, f"still running; console:\n{fresh_vm.tail()}"
        await anyio.sleep(0.1)
    assert "reboot: Power down" in fresh_vm.console_text()
