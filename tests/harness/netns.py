"""Network namespaces for the network tests, and tiny probes to run inside them.

* :func:`netns` creates a uniquely named namespace (``ip netns add``), brings its
  ``lo`` up and, on exit -- failure included -- ends the processes started through
  it (by pid) and deletes it, which also removes every interface inside.
* :meth:`NetNs.entered` moves the *calling thread* into the namespace
  (``setns(2)``) and back: the code under test (pyroute2 sockets, ``nft``
  subprocesses, ``/proc/sys/net`` writes, ``/dev/net/tun``) then acts on that
  namespace exactly as it would on the host's.
* :func:`veth_guest` plugs a namespace standing in for a guest into a "host"
  namespace by a veth pair: the host end is a bridge port (named like a TAP), the
  guest end is ``eth0`` with the workspace's MAC and address.

Run as a script (``python netns.py CMD ...``, stdlib only) this file is also the
probe used inside namespaces: ``serve`` (TCP banner + UDP echo servers),
``tcp``/``udp``/``ping`` (exit 0 on success, 1 on failure), ``udpsend``
(fire and forget), ``arpspoof`` (forged ARP replies), ``sink``/``blast``
(TCP throughput).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_counter = itertools.count()


class NetnsUnavailable(Exception):
    """Network namespaces cannot be used here; the message says why."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class NetNs:
    name: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(*argv), check=check, timeout=timeout, input=input)

    def ip(self, *args: str) -> str:
        return self.run("ip", *args).stdout

    def probe(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run this file's probe CLI inside the namespace (never raises on failure)."""
        return self.run(sys.executable, __file__, *args, check=False, timeout=timeout)

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """Start a long-running process inside; it is ended when the namespace goes."""
        proc = subprocess.Popen(
            self.argv(*argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def serve(self, banner: str, *ports: int) -> subprocess.Popen[str]:
        """TCP banner and UDP echo servers on ``ports``; returns once they listen."""
        proc = self.spawn(sys.executable, __file__, "serve", banner, *map(str, ports))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server in {self.name} did not start: {err!r}")
        return proc

    def udp_counter(self, port: int) -> Callable[[], int]:
        """Count UDP datagrams arriving here for ``port`` (an nft counter in this
        namespace); returns a function reading the count."""
        self.run(
            "nft",
            "-f",
            "-",
            input=(
                "add table inet observe\ndelete table inet observe\n"
            "table inet observe {\n chain input {\n"
                "  type filter hook input priority -300; policy accept;\n"
                f"  udp dport {port} counter\n }}\n}}\n"
            ),
        )

        def read() -> int:
            out = self.run("nft", "-j", "list", "chain", "inet", "observe", "input").stdout
            for obj in json.loads(out)["nftables"]:
                for expr in obj.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        return int(expr["counter"]["packets"])
            raise RuntimeError("observe counter not found")

        return read

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the block."""
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(orig)
        finally:
            os.close(target)
            os.close(orig)

    def stop_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` unless namespaces, ip and nft can be used."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "nft"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise NetnsUnavailable(f"{tool} is not installed")


@contextlib.contextmanager
def netns(prefix: str = "ait") -> Iterator[NetNs]:
    """A fresh namespace, deleted (with everything in it) on exit."""
    check_available()
    name = f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
    _run(["ip", "netns", "add", name])
    ns = NetNs(name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        ns.stop_procs()
        _run(["ip", "netns", "del", name], check=False)


def veth_guest(
    host: NetNs, guest: NetNs, host_end: str, *, mac: str, address: str, prefix: int, gateway: str
) -> None:
    """veth ``host_end`` (in ``host``) <-> ``eth0`` (in ``guest``), guest configured
    the way the guest agent would configure a VM: MAC, address, default route."""
    host.ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", guest.name)
    guest.ip("link", "set", "eth0", "address", mac)
    guest.ip("addr", "add", f"{address}/{prefix}", "dev", "eth0")
    guest.ip("link", "set", "eth0", "up")
    guest.ip("route", "add", "default", "via", gateway)


def uplink(
    host: NetNs,
    internet: NetNs,
    *,
    host_addr: str,
    net_addr: str,
    prefix: int,
    extra: Sequence[str] = (),
) -> None:
    """A routed link from ``host`` to a namespace standing in for the internet.

    The internet namespace gets no route back to the workspaces' subnet, so a
    reply only arrives if the host masqueraded.  ``extra`` addresses (/32) are
    added to its ``lo`` and routed via the link from the host.
    """
    host.ip(
        "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", internet.name
    )
    host.ip("addr", "add", f"{host_addr}/{prefix}", "dev", "uplink0")
    host.ip("link", "set", "uplink0", "up")
    internet.ip("addr", "add", f"{net_addr}/{prefix}", "dev", "eth0")
    internet.ip("link", "set", "eth0", "up")
    host.ip("route", "add", "default", "via", net_addr)
    for addr in extra:
        internet.ip("addr", "add", f"{addr}/32", "dev", "lo")


# --- probes (run as a script inside a namespace; stdlib only) -----------------------------


def _cmd_serve(banner: str, ports: list[int]) -> None:
    import socket
    import threading

    def tcp(sock: socket.socket) -> None:
        while True:
            conn, _ = sock.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(banner.encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)
                # Drain what the client sent (an HTTP request from curl) so the
                # close is a FIN, not a reset for unread data.
                conn.settimeout(2)
                while conn.recv(4096):
                    pass

    def udp(sock: socket.socket) -> None:
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(banner.encode() + b":" + data, peer)

    for port in ports:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("0.0.0.0", port))
        t.listen(64)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
        threading.Thread(target=tcp, args=(t,), daemon=True).start()
        threading.Thread(target=udp, args=(u,), daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def _cmd_tcp(host: str, port: int, timeout: float, src: str | None) -> int:
    import socket

    try:
        with socket.create_connection(
            (host, port), timeout=timeout, source_address=(src, 0) if src else None
        ) as s:
            print(s.makefile().readline().strip())
        return 0
    except OSError as exc:
        print(f"fail: {exc}", file=sys.stderr)
        return 1


def _cmd_udp(host: str, port: int, timeout: float) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"ping", (host, port))
            print(s.recvfrom(2048)[0].decode())
            return 0
        except OSError as exc:
            print(f"fail: {exc}", file=sys.stderr)
            return 1


def _cmd_udpsend(host: str, port: int, src: str | None) -> int:
    """Fire three datagrams (no answer expected): for one-way observations."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if src:
            s.bind((src, 0))
        for _ in range(3):
            s.sendto(b"x", (host, port))
    return 0


def _cmd_arpspoof(iface: str, claimed_ip: str, target_ip: str, target_mac: str) -> int:
    """Send ARP replies telling ``target`` that ``claimed_ip`` is at our MAC."""
    import socket

    with open(f"/sys/class/net/{iface}/address") as f:
        ours = bytes.fromhex(f.read().strip().replace(":", ""))
    theirs = bytes.fromhex(target_mac.replace(":", ""))
    arp = (
        b"\x00\x01\x08\x00\x06\x04\x00\x02"
        + ours + socket.inet_aton(claimed_ip)
        + theirs + socket.inet_aton(target_ip)
    )  # fmt: skip
    frame = theirs + ours + b"\x08\x06" + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for _ in range(3):
            s.send(frame)
            time.sleep(0.05)
    return 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _cmd_ping(host: str, timeout: float, src: str | None) -> int:
    """One ICMP echo over a raw socket (no ping binary needed); 0 on a reply."""
    import socket

    ident = os.getpid() & 0xFFFF
    payload = b"agentiso"
    header = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big")
    csum = _checksum(header + payload)
    packet = header[:2] + csum.to_bytes(2, "big") + header[4:] + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        if src:
            s.bind((src, 0))
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(2048)
            except OSError:
                break
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if peer[0] == host and icmp[0] == 0 and int.from_bytes(icmp[4:6], "big") == ident:
                return 0
    print("fail: no echo reply", file=sys.stderr)
    return 1


def _cmd_sink(port: int) -> None:
    import socket

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(1 << 20):
                pass


def _cmd_blast(host: str, port: int, seconds: float) -> int:
    """Send for ``seconds``; print MiB/s."""
    import socket

    buf = b"\0" * (1 << 20)
    sent = 0
    with socket.create_connection((host, port), timeout=10) as s:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            s.sendall(buf)
            sent += len(buf)
        s.shutdown(socket.SHUT_WR)
        elapsed = time.monotonic() - start
    print(f"{sent / elapsed / (1 << 20):.1f}")
    return 0


def main(argv: list[str]) -> int:
    def opt_src(rest: list[str]) -> str | None:
        return rest[rest.index("--src") + 1] if "--src" in rest else None

    cmd, *rest = argv
    if cmd == "serve":
        _cmd_serve(rest[0], [int(p) for p in rest[1:]])
        return 0
    if cmd == "tcp":
        return _cmd_tcp(rest[0], int(rest[1]), float(rest[2]), opt_src(rest))
    if cmd == "udp":
        return _cmd_udp(rest[0], int(rest[1]), float(rest[2]))
    if cmd == "udpsend":
        return _cmd_udpsend(rest[0], int(rest[1]), opt_src(rest))
    if cmd == "arpspoof":
        return _cmd_arpspoof(rest[0], rest[1], rest[2], rest[3])
    if cmd == "ping":
        return _cmd_ping(rest[0], float(rest[1]), opt_src(rest))
    if cmd == "sink":
        _cmd_sink(int(rest[0]))
        return 0
    if cmd == "blast":
        return _cmd_blast(rest[0], int(rest[1]), float(rest[2]))
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
