"""Real TAP devices, made by the network layer inside a namespace this test creates.

A TAP is non-persistent: it lives while some process holds its fd.  These tests
check the life cycle the VM engine relies on, with a real QEMU holding the fd
where QEMU is installed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.privhelper.net.config import default_settings
from agentiso.privhelper.net.errors import NetConflict
from agentiso.privhelper.net.manager import NetworkManager
from agentiso.privhelper.net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR
from tests.harness.netns import NetNs, NetnsUnavailable, netns

TUNGETIFF = 0x800454D2


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[NetNs, NetworkManager]]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip(reason="/dev/net/tun is missing")
    try:
        ctx = netns("ait")
    except NetnsUnavailable as exc:
        pytest.skip(reason=str(exc))
    with ctx as ns:
        mgr = NetworkManager(default_settings(), tmp_path)
        try:
            with ns.entered():
                mgr.start()
            yield ns, mgr
        finally:
            with ns.entered():
                mgr.teardown()
            mgr.links.close()


def _link(ns: NetNs, name: str) -> str | None:
    r = ns.run("ip", "-o", "link", "show", "dev", name, check=False)
    return r.stdout if r.returncode == 0 else None


def _wait_gone(ns: NetNs, name: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _link(ns, name) is None:
            return True
        time.sleep(0.05)
    return False


def test_tap_life_cycle(host: tuple[NetNs, NetworkManager]) -> None:
    ns, mgr = host
    with ns.entered():
        att = mgr.attach("ws1", 1000)
    try:
        assert att.tap_name == "ai-0a2a0002"
        assert (att.address, att.gateway, att.prefix) == ("10.42.0.2", "10.42.0.1", 16)
        assert att.mac == "02:a6:0a:2a:00:02"
        assert att.dns == ("1.1.1.1", "8.8.8.8")
        assert not os.get_inheritable(att.tap_fd)
        ifr = fcntl.ioctl(att.tap_fd, TUNGETIFF, struct.pack("16sH", b"", 0))
        name, flags = struct.unpack("16sH", ifr[:18])
        assert name.rstrip(b"\0").decode() == att.tap_name
        assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        line = _link(ns, att.tap_name)
        assert line is not None and "master br-agentiso" in line and ",UP" in line
        # While the fd is held, nobody else can take the TAP.
        with ns.entered(), pytest.raises(NetConflict):
            mgr.open_tap("ws1")
    finally:
        os.close(att.tap_fd)
    assert _wait_gone(ns, att.tap_name), "a non-persistent TAP outlived its last fd"
    # The VM starts again: same address, a new TAP.
    with ns.entered():
        again = mgr.open_tap("ws1")
    try:
        assert (again.tap_name, again.address) == (att.tap_name, att.address)
    finally:
        os.close(again.tap_fd)
    with ns.entered():
        mgr.detach("ws1")
    assert "ws1" not in mgr.state.workspaces
    assert _wait_gone(ns, att.tap_name)


def test_qemu_holds_the_tap(host: tuple[NetNs, NetworkManager], tmp_path: Path) -> None:
    """QEMU takes the fd (-netdev tap,fd=N); the helper closes its copy; the TAP
    lives exactly as long as QEMU."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip(reason="qemu-system-x86_64 is not installed")
    ns, mgr = host
    with ns.entered():
        att = mgr.attach("ws1", 1000)
    fd = att.tap_fd
    argv = [
        qemu, "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "tcg", "-m", "64", "-S",
        "-netdev", f"tap,id=n0,fd={fd}",
        "-device", f"virtio-net-device,netdev=n0,mac={att.mac}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, pass_fds=[fd], stderr=subprocess.PIPE, text=True)
    os.close(fd)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert _link(ns, att.tap_name) is not None
        # A helper restart changes nothing for a running VM: reapply keeps the TAP.
        restarted = NetworkManager(mgr.settings, mgr.state_path.parent)
        with ns.entered():
            report = restarted.start()
        restarted.links.close()
        assert report.removed_links == []
        assert _link(ns, att.tap_name) is not None
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert _wait_gone(ns, att.tap_name), "the TAP outlived QEMU"


def test_preflight_in_a_fresh_namespace() -> None:
    from agentiso.privhelper.net.preflight import check_network

    try:
        ctx = netns("aiq")
    except NetnsUnavailable as exc:
        pytest.skip(reason=str(exc))
    with ctx as ns, ns.entered():
        findings = check_network(default_settings())
        assert [f for f in findings if f.severity == "error"] == []
        assert any("created on demand" in f.message for f in findings)
        ns.run("ip", "link", "add", "br-agentiso", "type", "veth", "peer", "name", "x0")
        findings = check_network(default_settings())
        assert any(f.severity == "error" and "not a bridge" in f.message for f in findings)
