"""The agent's pure parts: ring buffer, network config, errno mapping, port
discovery over a sysfs-shaped tree, credit, freezer timer, reaper status."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import anyio
import pytest

from agentiso.guest.connection import Credit
from agentiso.guest.errors import from_oserror
from agentiso.guest.netconfig import (
    find_interface_by_mac,
    hosts_with_hostname,
    ip_commands,
    resolv_conf,
)
from agentiso.guest.reaper import decode_status
from agentiso.guest.ring import RingBuffer
from agentiso.guest.system import Freezer
from agentiso.guest.transport import find_virtio_port, vsock_device_present
from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode


def test_ring_buffer_keeps_the_tail_and_reports_losses() -> None:
    r = RingBuffer(10)
    r.write(b"0123456789")
    assert r.read(0, 100) == (0, b"0123456789", 0)
    r.write(b"abc")
    assert r.total == 13 and r.start == 3
    assert r.read(0, 100) == (3, b"3456789abc", 3)
    assert r.read(5, 3) == (5, b"567", 0)
    assert r.read(13, 10) == (13, b"", 0)
    assert r.read(999, 10) == (13, b"", 0)  # past the end: clamped
    r.write(b"X" * 25)  # a write bigger than the ring
    assert r.read(0, 100) == (28, b"X" * 10, 28)
    with pytest.raises(ValueError):
        RingBuffer(0)


def test_ip_commands_for_a_full_config() -> None:
    req = gp.ConfigureNetwork(id=1, address="10.42.0.7", prefix=16, mac="52:54:00:00:00:07",
                              gateway="10.42.0.1", dns=["10.42.0.1"], mtu=1400)
    assert ip_commands(req, "eth0") == [
        ["ip", "link", "set", "dev", "eth0", "mtu", "1400"],
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["ip", "addr", "flush", "dev", "eth0"],
        ["ip", "addr", "add", "10.42.0.7/16", "dev", "eth0"],
        ["ip", "route", "replace", "default", "via", "10.42.0.1", "dev", "eth0"],
    ]
    bare = gp.ConfigureNetwork(id=1, address="fd00::5", prefix=64, interface="eth1")
    assert ["ip", "route"] not in [c[:2] for c in ip_commands(bare, "eth1")]


def test_resolv_conf_and_hosts() -> None:
    assert resolv_conf(["1.1.1.1", "9.9.9.9"], ["lan"]) == (
        "# written by agentiso-guest\nsearch lan\nnameserver 1.1.1.1\nnameserver 9.9.9.9\n")
    hosts = "127.0.0.1 localhost\n127.0.1.1 old\n::1 ip6-localhost\n"
    assert hosts_with_hostname(hosts, "ws.example") == (
        "127.0.0.1 localhost\n::1 ip6-localhost\n127.0.1.1 ws.example ws\n")
    assert hosts_with_hostname("", "ws") == "127.0.0.1 localhost\n127.0.1.1 ws\n"


def test_find_interface_by_mac(tmp_path: Path) -> None:
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "52:54:00:AA:bb:01")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert find_interface_by_mac("52:54:00:aa:BB:01", str(tmp_path)) == "eth0"
    assert find_interface_by_mac("52:54:00:aa:bb:02", str(tmp_path)) is None
    assert find_interface_by_mac("52:54:00:aa:bb:02", str(tmp_path / "none")) is None


def test_find_virtio_port_by_name_and_make_missing_node(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    dev = tmp_path / "dev"
    dev.mkdir()
    for port, name in (("vport0p0", "other"), ("vport1p1", gp_port := "org.agentiso.agent.0")):
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    (dev / "vport1p1").touch()
    assert find_virtio_port(gp_port, str(sysfs), str(dev)) == str(dev / "vport1p1")
    assert find_virtio_port("absent", str(sysfs), str(dev)) is None
    assert find_virtio_port(gp_port, str(tmp_path / "nosys"), str(dev)) is None


def test_vsock_device_detection(tmp_path: Path) -> None:
    assert not vsock_device_present(str(tmp_path / "missing"))
    (tmp_path / "module").mkdir()
    assert not vsock_device_present(str(tmp_path))
    (tmp_path / "virtio3").mkdir()
    assert vsock_device_present(str(tmp_path))


@pytest.mark.parametrize(("err", "code"), [
    (errno.ENOENT, ErrorCode.NOT_FOUND),
    (errno.EACCES, ErrorCode.PERMISSION_DENIED),
    (errno.EPERM, ErrorCode.PERMISSION_DENIED),
    (errno.EEXIST, ErrorCode.ALREADY_EXISTS),
    (errno.ENOTEMPTY, ErrorCode.CONFLICT),
    (errno.ENOSPC, ErrorCode.LIMIT_EXCEEDED),
    (errno.EFBIG, ErrorCode.TOO_LARGE),
    (errno.EISDIR, ErrorCode.INVALID),
    (errno.EIO, ErrorCode.INTERNAL),
])
def test_errno_mapping(err: int, code: ErrorCode) -> None:
    f = from_oserror(OSError(err, os.strerror(err)), "/x")
    assert f.code == code and f.message.startswith("/x: ")


def test_decode_status() -> None:
    assert decode_status(3 << 8) == (3, None)
    assert decode_status(signal.SIGKILL) == (None, 9)


@pytest.mark.anyio
async def test_credit_blocks_beyond_the_window() -> None:
    c = Credit(2)
    await c.wait_for(1)
    await c.wait_for(2)
    with anyio.move_on_after(0.05) as scope:
        await c.wait_for(3)
    assert scope.cancelled_caught
    c.ack(1)
    with anyio.fail_after(1):
        await c.wait_for(3)
    c.ack(0)  # an old ack never takes credit back
    assert c.acked == 1


@pytest.mark.anyio
async def test_freezer_thaws_by_itself_when_the_host_is_gone(tmp_path: Path) -> None:
    calls: list[str] = []
    fz = Freezer(str(tmp_path), freeze=lambda fd: calls.append("freeze"),
                 thaw=lambda fd: calls.append("thaw"))
    fz.freeze(0.1)
    fz.freeze(0.2)  # re-arms, does not freeze twice
    assert fz.frozen and calls == ["freeze"]
    with anyio.fail_after(10):  # wait for the thaw itself, not a guess of when it comes
        while fz.frozen:
            await anyio.sleep(0.01)
    assert not fz.frozen and calls == ["freeze", "thaw"] and fz.auto_thaws == 1
    fz.freeze(30)
    assert fz.thaw() and not fz.thaw()
    assert calls == ["freeze", "thaw", "freeze", "thaw"]


@pytest.mark.anyio
async def test_a_thaw_sent_during_a_slow_freeze_is_not_lost(tmp_path: Path) -> None:
    """The host's Thaw can arrive while the Freeze is still syncing (a
    guest-call timeout, then the helper's Thaw): it must thaw after the
    freeze, not find "not frozen" and leave the filesystem frozen until the
    automatic thaw.  Two Freezes at once freeze once."""
    calls: list[str] = []
    started = threading.Event()

    def slow_freeze(fd: int) -> None:
        started.set()
        time.sleep(0.3)  # the sync and FIFREEZE of a busy filesystem
        calls.append("freeze")

    fz = Freezer(str(tmp_path), freeze=slow_freeze, thaw=lambda fd: calls.append("thaw"))
    thawed: list[bool] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fz.hold, 30.0)
            tg.start_soon(fz.hold, 30.0)  # at once: re-arms, never FIFREEZE twice
            await anyio.to_thread.run_sync(started.wait)

            async def release() -> None:
                thawed.append(await fz.release())

            tg.start_soon(release)
    assert calls == ["freeze", "thaw"] and thawed == [True]
    assert not fz.frozen and fz.auto_thaws == 0


@pytest.mark.anyio
async def test_supervisor_restarts_a_failing_transport() -> None:
    from agentiso.guest.agent import _supervise

    runs: list[int] = []
    done = anyio.Event()

    async def transport() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise OSError("port vanished")
        done.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_supervise, "test", transport)
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    assert runs == [0, 1, 2]


# --- Reidentify's pure parts --------------------------------------------------------------

def _reidentify(**over: object) -> gp.Reidentify:
    fields: dict[str, object] = {
        "id": 1, "mac": "52:54:0A:2A:00:09", "address": "10.42.0.9", "prefix": 16,
        "hostname": "fork-1", "machine_id": "0123456789abcdef" * 2, "entropy": b"e" * 32,
        "time_ns": 1_800_000_000 * 10**9, "gateway": "10.42.0.1", **over,
    }
    return gp.Reidentify(**fields)  # type: ignore[arg-type]


def test_rand_pool_info_credits_every_byte() -> None:
    import struct

    from agentiso.guest.identity import rand_pool_info

    blob = rand_pool_info(b"\x01" * 40)
    assert struct.unpack("ii", blob[:8]) == (320, 40) and blob[8:] == b"\x01" * 40


def test_the_interface_to_reidentify(tmp_path: Path) -> None:
    from agentiso.guest.identity import interfaces, pick_interface

    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "52:54:0A:2A:00:02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    nics = interfaces(str(tmp_path))
    assert nics == {"eth0": "52:54:0a:2a:00:02"}  # loopback is never a candidate
    assert pick_interface(nics, "52:54:0a:2a:00:09", "52:54:0A:2A:00:02") == "eth0"
    assert pick_interface(nics, "52:54:0a:2a:00:09", None) == "eth0"  # the only one
    two = {**nics, "eth1": "52:54:0a:2a:00:09"}
    assert pick_interface(two, "52:54:0a:2a:00:09", None) == "eth1"  # already has the new MAC
    assert pick_interface(two, "52:54:0a:2a:00:07", "52:54:0a:2a:00:02") == "eth0"
    assert pick_interface(two, "52:54:0a:2a:00:07", None) is None  # ambiguous: refuse
    assert pick_interface({}, "52:54:0a:2a:00:07", None) is None
    assert interfaces(str(tmp_path / "missing")) == {}


def test_reidentify_network_commands_set_the_mac_with_the_link_down() -> None:
    from agentiso.guest.identity import network_commands

    cmds = network_commands(_reidentify(), "eth0")
    assert cmds == [
        ["ip", "link", "set", "dev", "eth0", "down"],
        ["ip", "link", "set", "dev", "eth0", "address", "52:54:0a:2a:00:09"],
        ["ip", "neigh", "flush", "dev", "eth0"],
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["ip", "addr", "flush", "dev", "eth0"],
        ["ip", "addr", "add", "10.42.0.9/16", "dev", "eth0"],
        ["ip", "route", "replace", "default", "via", "10.42.0.1", "dev", "eth0"],
    ]
    bare = network_commands(_reidentify(gateway=None), "eth0")
    assert ["ip", "route"] not in [c[:2] for c in bare]


@pytest.mark.anyio
async def test_reidentify_is_refused_outside_a_vm_and_failures_name_the_step() -> None:
    from agentiso.guest import identity
    from agentiso.guest.errors import Failed

    class Ctx:
        class state:
            pid1 = False

    with pytest.raises(Failed) as info:
        await identity.handle_reidentify(_reidentify(), Ctx())  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.PERMISSION_DENIED

    async def boom() -> None:
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(Failed) as info:
        await identity._step("clock", boom)
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    assert "'clock'" in info.value.message and "not permitted" in info.value.message
