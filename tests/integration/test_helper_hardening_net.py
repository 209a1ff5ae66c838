"""Issue 14's network attacks and the RT-signal kill, through the real helper.

One private helper (its own network namespace), one VM of an unprivileged
user (ALICE) with a web server in it.  The attacks:

* a forward on a port that something else holds -- an IPv6-only listener,
  an IPv6 UDP socket, another nft table's DNAT rule -- is refused;
* another uid's ``curl 127.0.0.1:PORT`` (or to another host address) does not
  reach the forward, while the owner's does (curls run with setpriv as two
  different uids inside the helper's namespace);
* the VM's QEMU killed by a real-time signal: the helper records how it ended
  and keeps serving (the watcher used to raise on SIGRTMIN+k).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness.images import skip_unless_image
from tests.support.helper_process import IMAGES, HelperProcess, run_as, running_helper

GROUP = 64361
ALICE = 64362
BOB = 64363
GUEST_PORT = 8000
FORWARD = 18080
#: An interpreter any uid may run (the venv's, or a shim, may sit under /root).
PYTHON = getattr(sys, "_base_executable", sys.executable)
pytestmark = skip_unless_image("minimal")

SESSION = textwrap.dedent(
    """
    import anyio, json
    from agentiso.frontend.guest_channel import open_guest
    from agentiso.protocol import helper as hp
    from agentiso.protocol.blocking import BlockingHelperClient
    from agentiso.protocol.errors import RemoteError
    SOCK = {sock!r}
    c = BlockingHelperClient(SOCK, timeout=180)
    def out(x): print(json.dumps(x), flush=True)
    def call(msg):
        try:
            r = c.request(msg)
            return [type(r).__name__, ""]
        except RemoteError as e:
            return [e.code, e.message]
    """
)


def as_alice(helper: HelperProcess, code: str, timeout: float = 300) -> list[object]:
    prog = SESSION.format(sock=str(helper.socket)) + textwrap.dedent(code)
    r = run_as(ALICE, ALICE, [GROUP], prog, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def in_ns(helper: HelperProcess, *argv: str, uid: int | None = None,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the helper's namespace, as ``uid`` (no groups, no caps) if given."""
    drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                   "--clear-groups", "--inh-caps=-all"]
    return subprocess.run(["ip", "netns", "exec", helper.netns, *drop, *argv],
                          capture_output=True, text=True, timeout=60, check=check)


def curl(helper: HelperProcess, uid: int, host: str, port: int = FORWARD) -> subprocess.CompletedProcess[str]:  # noqa: E501
    return in_ns(helper, "curl", "-s", "-m", "5", f"http://{host}:{port}/index.txt", uid=uid)


def mount_cgroups(helper: HelperProcess) -> None:
    """Give the helper the host's cgroup v1 hierarchies, as a helper started
    by systemd sees them: ``ip netns exec`` mounted a fresh /sys in the
    helper's own mount namespace, which hid them.  Gone with that namespace."""
    assert helper.proc is not None
    here = cgroup_dirs(os.getpid())
    if set(here) != {"cpu", "memory", "pids"}:
        return  # no v1 hierarchies on this host: the limits test skips
    script = "mount -t tmpfs cgroups /sys/fs/cgroup && " + " && ".join(
        f"mkdir /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
        for c in ("cpu", "memory", "pids")
    )
    subprocess.run(["nsenter", "-t", str(helper.proc.pid), "-m", "sh", "-c", script],
                   check=True, timeout=30)


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    with running_helper(group=GROUP, extra_args=("--images-dir", str(IMAGES))) as h:
        mount_cgroups(h)
        res = as_alice(h, f"""
            c.request(hp.VolumeCreate(id=0, name="ws", source=hp.FromImage(image="minimal")))
            out(c.request(hp.VmStart(id=0, name="web", volume="ws", memory_mib=192)).state)
            async def serve():
                async with open_guest(SOCK, "web") as g:
                    await g.exec(shell="mkdir -p /srv && echo hello-from-web > /srv/index.txt")
                    await g.job_start(shell="cd /srv && exec python3 -m http.server {GUEST_PORT}")
            anyio.run(serve)
            out(call(hp.ForwardAdd(id=0, vm="web", host_port={FORWARD}, guest_port={GUEST_PORT})))
        """)
        assert res == ["running", ["VmInfo", ""]], res
        deadline = time.monotonic() + 60
        while curl(h, ALICE, "127.0.0.1").stdout.strip() != "hello-from-web":
            assert time.monotonic() < deadline, "the guest's web server never answered"
            time.sleep(0.5)
        yield h


def _holder(helper: HelperProcess, family: str, addr: str, kind: str, port: int
            ) -> subprocess.Popen[str]:
    """A socket held in the helper's namespace (root's, as another service's would be)."""
    code = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.{family}, socket.{kind})
        if socket.{family} == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(({addr!r}, {port}))
        if socket.{kind} == socket.SOCK_STREAM:
            s.listen()
        print("ready", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen(["ip", "netns", "exec", helper.netns, "python3", "-c", code],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        p.wait()
        pytest.fail(f"holder did not start: {p.stderr.read() if p.stderr else ''}")
    return p


def test_forward_on_a_port_held_elsewhere_is_refused(helper: HelperProcess) -> None:
    if "inet6 ::1" not in in_ns(helper, "ip", "-6", "addr", "show", "dev", "lo").stdout:
        pytest.skip("no IPv6 on loopback in the helper's namespace (IPv6 disabled here)")
    holders = [
        _holder(helper, "AF_INET6", "::1", "SOCK_STREAM", 18101),  # the acceptance case
        _holder(helper, "AF_INET6", "::", "SOCK_STREAM", 18102),
        _holder(helper, "AF_INET6", "::1", "SOCK_DGRAM", 18103),
        _holder(helper, "AF_INET", "127.0.0.1", "SOCK_DGRAM", 18104),
    ]
    rule = ("add table ip squatter\n"
            "add chain ip squatter pre { type nat hook output priority -100; }\n"
            "add rule ip squatter pre tcp dport 18105 dnat to 192.0.2.1\n")
    subprocess.run(["ip", "netns", "exec", helper.netns, "nft", "-f", "-"], input=rule,
                   text=True, check=True, timeout=30)
    try:
        res = as_alice(helper, """
            for port, proto in ((18101, "tcp"), (18102, "tcp"), (18103, "udp"),
                                (18104, "udp"), (18105, "tcp"), (18106, "tcp")):
                out(call(hp.ForwardAdd(id=0, vm="web", host_port=port, guest_port=8000,
                                       protocol=proto)))
            out(call(hp.ForwardRemove(id=0, vm="web", host_port=18106)))
        """)
    finally:
        for p in holders:
            p.kill()
            p.wait()
        in_ns(helper, "nft", "delete", "table", "ip", "squatter")
    *refused, free, removed = res
    for (code, message), why in zip(refused, ("socket is bound", "socket is bound",
                                              "socket is bound", "socket is bound",
                                              "ip squatter/pre"), strict=True):
        assert code == "conflict" and why in str(message), (code, message)
        assert "choose another host port" in str(message)
    assert free == ["VmInfo", ""] and removed == ["VmInfo", ""]  # a free port still works


def test_forward_is_local_to_its_owner(helper: HelperProcess) -> None:
    ok = curl(helper, ALICE, "127.0.0.1")
    assert ok.returncode == 0 and ok.stdout.strip() == "hello-from-web"
    # Another uid, on the same host, gets nothing: not DNATed, nothing listens.
    other = curl(helper, BOB, "127.0.0.1")
    assert other.returncode != 0 and "hello" not in other.stdout
    # Nor through the host's other address (the gateway's, here).
    gw = "10.42.0.1"
    assert curl(helper, ALICE, gw).stdout.strip() == "hello-from-web"
    assert curl(helper, BOB, gw).returncode != 0
    # Root administers everything, forwards included.
    assert in_ns(helper, "curl", "-s", "-m", "5",
                 f"http://127.0.0.1:{FORWARD}/index.txt").stdout.strip() == "hello-from-web"
    # BOB cannot take the port over with his own listener while the forward
    # exists: ALICE's connections are DNATed before any socket sees them.
    squat = subprocess.Popen(
        ["ip", "netns", "exec", helper.netns, "setpriv", f"--reuid={BOB}", f"--regid={BOB}",
         "--clear-groups", "--inh-caps=-all", PYTHON, "-c", textwrap.dedent(f"""
            import socket, time
            s = socket.socket(); s.bind(("127.0.0.1", {FORWARD})); s.listen()
            print("bound", flush=True)
            while True:
                c, _ = s.accept(); c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nsquatter\\n"); c.close()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert squat.stdout is not None and squat.stdout.readline().strip() == "bound"
        assert curl(helper, ALICE, "127.0.0.1").stdout.strip() == "hello-from-web"
        assert curl(helper, BOB, "127.0.0.1").stdout.strip() == "squatter"  # his own only
    finally:
        squat.kill()
        squat.wait()


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """QEMU's v1 cgroup directories (controller -> path)."""
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if f[2] == "cgroup":
            for opt in f[3].split(","):
                if opt in ("cpu", "memory", "pids"):
                    mounts[opt] = Path(f[1])
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            if c in mounts:
                out[c] = mounts[c] / path.lstrip("/")
    return out


def test_qemu_runs_under_cpu_memory_and_task_limits(helper: HelperProcess) -> None:
    [pid] = helper.qemu_pids()
    dirs = cgroup_dirs(pid)
    if set(dirs) != {"cpu", "memory", "pids"} or not str(dirs["memory"]).count("agentiso-"):
        pytest.skip(f"no cgroup v1 cpu/memory/pids hierarchies here: {dirs}")
    # 192 MiB of guest RAM + 64 MiB of TCG translation cache + 256 MiB for QEMU.
    limit = int((dirs["memory"] / "memory.limit_in_bytes").read_text())
    assert limit == (192 + 64 + 256) * 2**20
    assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"  # 1 vCPU
    assert (dirs["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (dirs["pids"] / "pids.max").read_text().strip() == "512"
    # Every thread of QEMU is inside.
    tasks = {int(t) for t in (dirs["memory"] / "tasks").read_text().split()}
    assert {int(t) for t in os.listdir(f"/proc/{pid}/task")} <= tasks
    # The guest spins its vCPU for 3 s: QEMU stays within its one CPU.
    before = int((dirs["cpu"] / "cpu.stat").read_text().split()[1])  # nr_periods
    t0 = time.monotonic()
    cpu0 = _cpu_seconds(pid)
    as_alice(helper, """
        async def spin():
            async with open_guest(SOCK, "web") as g:
                await g.exec(shell="timeout 3 sh -c 'while :; do :; done'; true")
        anyio.run(spin)
    """)
    used = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    usage = int((dirs["memory"] / "memory.usage_in_bytes").read_text())
    peak = int((dirs["memory"] / "memory.max_usage_in_bytes").read_text())
    stat = dict(line.split() for line in (dirs["cpu"] / "cpu.stat").read_text().splitlines())
    print(f"cgroup figures: memory {usage / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB, "
          f"limit {limit / 2**20:.0f} MiB), CPU {used:.2f} cores while spinning, "
          f"periods {int(stat['nr_periods']) - before}, throttled {stat['nr_throttled']}, "
          f"tasks {(dirs['pids'] / 'pids.current').read_text().strip()}")
    assert peak < limit
    assert used <= 1.2  # one vCPU's quota (plus the sampling's slack)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_qemu_killed_by_a_real_time_signal_does_not_take_the_watcher_down(
    helper: HelperProcess,
) -> None:
    pids = helper.qemu_pids()
    assert len(pids) == 1
    cgroups = cgroup_dirs(pids[0])
    rt = signal.SIGRTMIN + 3
    os.kill(pids[0], rt)
    deadline = time.monotonic() + 60
    while True:
        res = as_alice(helper, """
            v = c.request(hp.VmGet(id=0, name="web"))
            out([v.state, v.reason or ""])
        """)
        state, reason = res[0]  # type: ignore[misc]
        if state in ("crashed", "stopped"):
            break
        assert time.monotonic() < deadline, f"the helper never saw QEMU die: {res}"
        time.sleep(0.5)
    assert state == "crashed" and "SIGRTMIN+3" in reason, (state, reason)
    assert helper.proc is not None and helper.proc.poll() is None
    with BlockingHelperClient(str(helper.socket)) as c:
        assert isinstance(c.request(hp.Ping(id=0)), hp.Pong)
    assert "Traceback" not in helper.log()
    # The dead VM's forward goes with it; the name can be stopped (forgotten).
    assert as_alice(helper, 'out(call(hp.VmStop(id=0, name="web")))') == [["Done", ""]]
    # Its cgroups went with it, and so did the engine's (it had no other VM).
    for d in cgroups.values():
        if "agentiso-" in str(d):
            assert not d.exists() and not d.parent.exists(), d
