"""The acceptance scenarios with two real VMs (QEMU microvm under TCG, the minimal
image), each on a TAP made by the network layer, inside namespaces the test creates.

Each VM is started by the real VM engine (:func:`tests.harness.engine.engine_vm`)
as the helper starts a workspace: the TAP fd from :meth:`NetworkManager.attach`
and its MAC as the VM's :class:`NetAttachment`, and the guest configured by the
agent's ``configure_network``.  Probes inside the guests are this repo's
tests/harness/netns.py, uploaded with ``file_write`` and run with ``exec``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentiso.privhelper.net.config import NetConfig, parse_net_config
from agentiso.privhelper.net.manager import Attachment, NetworkManager
from agentiso.privhelper.net.model import AllowRule, Forward, NetPolicy, PortRange
from agentiso.privhelper.vm.spec import NetAttachment
from agentiso.protocol import guest as gp
from agentiso.protocol.framing import encode_frame
from tests.harness import netns as netns_mod
from tests.harness.engine import EngineVM, engine_vm
from tests.harness.images import require_image
from tests.harness.netns import NetnsUnavailable, netns, uplink

INTERNET = "198.51.100.2"
HOST_UPLINK = "198.51.100.1"
ALLOWED = "203.0.113.5"
PROBE = "/tmp/probe.py"


class Agent:
    """A minimal blocking client of the guest agent over the virtio-serial channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = gp.GuestStreamDecoder()
        self.frames: list[bytes] = []
        self.next_id = 1

    def _frame(self, deadline: float) -> bytes:
        while not self.frames:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no answer from the guest agent") from None
            if not chunk:
                raise ConnectionError("guest channel closed")
            self.frames += [f for f in self.decoder.feed(chunk) if f is not None]
        return self.frames.pop(0)

    def hello(self, timeout: float = 60) -> gp.Hello:
        deadline = time.monotonic() + timeout
        msg = gp.response_codec.decode(self._frame(deadline))
        assert isinstance(msg, gp.Hello), msg
        return msg

    def call(self, cls: type[Any], timeout: float = 30, **fields: Any) -> Any:
        rid = self.next_id
        self.next_id += 1
        body = gp.request_codec.encode(cls(id=rid, **fields))
        self.sock.sendall(encode_frame(body, gp.GUEST_MAX_FRAME))
        deadline = time.monotonic() + timeout
        while True:
            msg = gp.response_codec.decode(self._frame(deadline))
            if msg.id == rid and not isinstance(msg, gp.STREAM_EVENTS):
                if isinstance(msg, gp.Error):
                    raise AssertionError(f"guest error: {msg.code}: {msg.message}")
                return msg

    def sh(self, command: str, timeout: float = 30) -> tuple[int, str]:
        r = self.call(gp.Exec, timeout=timeout + 5, shell=command, timeout_s=timeout)
        out = (r.stdout + r.stderr).decode(errors="replace").strip()
        return (r.exit_code if r.exit_code is not None else -1), out


class GuestVM:
    def __init__(self, vm: EngineVM, agent: Agent, att: Attachment) -> None:
        self.vm, self.agent, self.att = vm, agent, att

    def probe(self, *args: str, timeout: float = 20) -> tuple[int, str]:
        return self.agent.sh(f"python3 {PROBE} {' '.join(args)}", timeout)

    def tcp(self, host: str, port: int, *extra: str, fail_timeout: bool = False) -> str | None:
        rc, out = self.probe("tcp", host, str(port), "1" if fail_timeout else "8", *extra)
        return out if rc == 0 else None

    def blocked(self, host: str, port: int, *extra: str) -> bool:
        return self.tcp(host, port, *extra, fail_timeout=True) is None

    def ping(self, host: str, timeout: str = "3") -> bool:
        return self.probe("ping", host, timeout)[0] == 0


def start_vm(stack: contextlib.ExitStack, att: Attachment) -> EngineVM:
    """Boot the minimal image through the engine on ``att``'s TAP (stopped by ``stack``)."""
    try:
        return stack.enter_context(
            engine_vm("minimal", memory_mib=192, net=NetAttachment(tap_fd=att.tap_fd, mac=att.mac))
        )
    finally:
        os.close(att.tap_fd)  # the engine never closes it; QEMU holds its own copy


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_image("minimal")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip(reason="/dev/net/tun is missing")
    try:
        namespaces = [netns("aivh"), netns("aivi")]
    except NetnsUnavailable as exc:
        pytest.skip(reason=str(exc))
    probe_src = Path(netns_mod.__file__).read_bytes()
    tmp = tmp_path_factory.mktemp("netvms")
    # The "internet" is on the host's uplink network, blocked by default as one
    # of the host's own: exempt it, as an operator would.
    settings = parse_net_config(NetConfig(exempt=("198.51.100.0/24",)))
    with namespaces[0] as host, namespaces[1] as net, contextlib.ExitStack() as stack:
        mgr = NetworkManager(settings, tmp / "state")
        stack.callback(mgr.links.close)

        def teardown() -> None:
            with host.entered():
                mgr.teardown()

        stack.callback(teardown)
        with host.entered():
            mgr.start()
        uplink(host, net, host_addr=HOST_UPLINK, net_addr=INTERNET, prefix=24, extra=[ALLOWED])
        net.serve("internet", 80, 8443)
        host.serve("hostsvc", 2222)
        vms: dict[str, GuestVM] = {}
        booted = []
        for name in ("a", "b"):
            with host.entered():
                att = mgr.attach(name, 1000)
            booted.append((name, start_vm(stack, att), att))
        for name, vm, att in booted:
            sock = vm.connect_channel()
            stack.callback(sock.close)
            agent = Agent(sock)
            agent.hello()
            agent.call(
                gp.ConfigureNetwork,
                mac=att.mac,
                address=att.address,
                prefix=att.prefix,
                gateway=att.gateway,
                dns=list(att.dns),
            )
            agent.call(gp.FileWrite, path=PROBE, data=probe_src)
            agent.call(gp.JobStart, shell=f"python3 {PROBE} serve {name} 80")
            vms[name] = GuestVM(vm, agent, att)
        for g in vms.values():  # the servers are up once they answer locally
            deadline = time.monotonic() + 30
            while g.tcp("127.0.0.1", 80) is None:
                assert time.monotonic() < deadline, "guest server did not start"
        yield {"host": host, "net": net, "mgr": mgr, "vms": vms}


def policy(lab: dict[str, Any], name: str, pol: NetPolicy) -> None:
    with lab["host"].entered():
        lab["mgr"].set_policy(name, pol)


@pytest.fixture
def fresh(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for name in ("a", "b"):
        if name in lab["mgr"].state.workspaces:
            policy(lab, name, NetPolicy())
    yield lab


def test_vms_isolated_by_default_then_peered(fresh: dict[str, Any]) -> None:
    a, b = fresh["vms"]["a"], fresh["vms"]["b"]
    assert a.ping("10.42.0.1")  # the guest's network is up (control)
    assert a.blocked(b.att.address, 80)
    assert not a.ping(b.att.address, "1")
    assert b.blocked(a.att.address, 80)
    policy(fresh, "a", NetPolicy(peers=("b",)))
    assert a.tcp(b.att.address, 80) == "b"
    assert b.ping(a.att.address)


def test_vm_egress_and_allow_list(fresh: dict[str, Any]) -> None:
    a = fresh["vms"]["a"]
    assert a.blocked(INTERNET, 80)
    policy(fresh, "a", NetPolicy(egress=True))
    assert a.tcp(INTERNET, 80) == "internet"
    rule = AllowRule(cidr=f"{ALLOWED}/32", ports=(PortRange(80, 80),))
    policy(fresh, "a", NetPolicy(egress=True, allow=(rule,)))
    assert a.tcp(ALLOWED, 80) == "internet"
    assert a.blocked(ALLOWED, 8443)
    assert a.blocked(INTERNET, 80)
    assert a.blocked(HOST_UPLINK, 2222)  # host services stay closed


def test_vm_spoofed_source_dropped(fresh: dict[str, Any]) -> None:
    a = fresh["vms"]["a"]
    policy(fresh, "a", NetPolicy(egress=True))
    assert a.agent.sh("ip addr add 10.42.0.99/32 dev eth0")[0] == 0
    try:
        assert a.blocked(INTERNET, 80, "--src", "10.42.0.99")
    finally:
        a.agent.sh("ip addr del 10.42.0.99/32 dev eth0")
    assert a.tcp(INTERNET, 80) == "internet"


def test_vm_forward_from_host_localhost(fresh: dict[str, Any]) -> None:
    host = fresh["host"]
    with host.entered():
        fresh["mgr"].add_forward("a", Forward(host_port=18080, guest_port=80))
    try:
        curl = host.run("curl", "-s", "--http0.9", "-m", "10", "http://127.0.0.1:18080/")
        assert curl.stdout.strip() == "a"
    finally:
        with host.entered():
            fresh["mgr"].remove_forward("a", 18080)


def test_destroying_a_vm_leaves_nothing(fresh: dict[str, Any]) -> None:
    host, mgr, a = fresh["host"], fresh["mgr"], fresh["vms"]["a"]
    with host.entered():
        mgr.add_forward("a", Forward(host_port=18081, guest_port=80))
    a.vm.stop()
    with host.entered():
        mgr.detach("a")
    links = host.ip("-o", "link")
    ruleset = host.run("nft", "list", "ruleset").stdout
    for needle in (a.att.tap_name, a.att.mac, a.att.address, "ws-a", "18081"):
        assert needle not in links and needle not in ruleset
    assert "a" not in mgr.state.workspaces
    assert fresh["vms"]["b"].ping("10.42.0.1")  # b unaffected
