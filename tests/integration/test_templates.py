"""Boot templates through the real helper (privhelper/vms/templates.py).

A helper with ``[templates] build = "on-miss"``: the first start of the image
boots cold and builds the template in the background; later starts of fresh
volumes of the same image and shape resume it with a new identity, for two
users.  Checked: each differs in address, MAC, hostname, machine-id and
/dev/urandom; a write in one shows in no other (nor in a later one); they
cannot reach each other; a QEMU killed mid-claim leaves nothing and the retry
succeeds; a changed image is never served by the stale template (the next
start boots cold and a new template replaces the old one).  With
``share_memory`` (on here): clones map the template's RAM, a sealed memfd,
private copy-on-write: their PSS is below their RSS, nothing (not even root)
can write that memfd, and its bytes are the same after the clones wrote to
their memory (a tmpfs file, a sysctl) that no other clone sees.

Real QEMU (TCG), the real image and agent, in the namespace the helper
harness made; one helper and one template for the module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.privhelper.vms.templates import NAME_PREFIX, SNAPSHOT, TEMPLATE_OWNER
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import RemoteError
from tests.harness import netns as netns_mod
from tests.harness.images import pin_image, skip_unless_image
from tests.harness.netns import NetNs
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper

pytestmark = skip_unless_image("minimal")

USER_A, USER_B, USER_C = 61001, 61002, 61003
PORT = 80
PROBE = "/root/probe.py"
POLICY = hp.NetworkPolicy(inbound_ports=[PORT])
CONFIG = ("[limits]\nper_uid_memory_mib = 4096\nper_uid_vms = 8\n"
          "[templates]\nbuild = \"on-miss\"\nshare_memory = true\nram_keep_s = 4\n")
RAM_KEEP_S = 4.0
TEMPLATE_WAIT_S = 300.0


@dataclass
class Lab:
    helper: HelperProcess
    images: Path
    host: NetNs
    info: dict[str, hp.VmInfo] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)
    #: Seconds from VolumeCreate to the first exec's answer.
    create_s: dict[str, float] = field(default_factory=dict)

    def client(self) -> BlockingHelperClient:
        return BlockingHelperClient(str(self.helper.socket), timeout=300)

    def claims(self) -> int:
        return self.helper.log().count('"template_claimed"')

    def sh(self, vm: str, cmd: str, check: bool = True) -> str:
        async def run() -> str:
            async with open_guest(str(self.helper.socket), vm, owner=self.owner[vm]) as g:
                r = await g.exec(shell=cmd, timeout_s=60)
                assert not check or r.exit_code == 0, (vm, cmd, r)
                return r.stdout.decode().strip()

        return anyio.run(run)

    def create(self, vm: str, owner: int) -> hp.VmInfo:
        """Volume from the image and a VM on it, timed to the first exec."""
        t0 = time.monotonic()
        with self.client() as c:
            c.request(hp.VolumeCreate(id=0, name=f"{vm}-vol", owner=owner,
                                      source=hp.FromImage(image="minimal")))
            info = c.request(hp.VmStart(id=0, name=vm, volume=f"{vm}-vol", network=POLICY,
                                        owner=owner))
        assert isinstance(info, hp.VmInfo) and info.state == "running", info
        self.info[vm], self.owner[vm] = info, owner
        self.sh(vm, "true")
        self.create_s[vm] = time.monotonic() - t0
        return info

    def address(self, vm: str) -> str:
        net = self.info[vm].network
        assert net is not None
        return net.address

    def templates(self) -> dict[str, hp.VolumeInfo]:
        """The helper's ready templates (volume name -> info)."""
        with self.client() as c:
            vols = c.request(hp.VolumeList(id=0, owner=TEMPLATE_OWNER))
        assert isinstance(vols, hp.Volumes)
        return {v.name: v for v in vols.volumes if v.name.startswith(NAME_PREFIX)
                and any(s.name == SNAPSHOT and s.memory for s in v.snapshots)}

    def wait_template(self, not_in: Collection[str] = ()) -> str:
        deadline = time.monotonic() + TEMPLATE_WAIT_S
        while time.monotonic() < deadline:
            new = set(self.templates()) - set(not_in)
            if new:
                return new.pop()
            time.sleep(0.5)
        raise AssertionError(f"no template within {TEMPLATE_WAIT_S} s:\n"
                             f"{self.helper.log()[-3000:]}")


def ram_fds(pid: int) -> dict[Path, str]:
    """The template RAM memfds the helper ``pid`` holds: /proc path -> name
    (``/memfd:agentiso-tpl-<key>-<owner uid> (deleted)``)."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:agentiso-tpl-"):
            out[fd] = target
    return out


def template_rams(pid: int) -> dict[str, str]:
    """The template RAM memfds the helper ``pid`` holds: /proc path -> sha256."""
    out = {}
    for fd in ram_fds(pid):
        h = hashlib.sha256()
        with open(fd, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out[str(fd)] = h.hexdigest()
    return out


def ram_inodes(pid: int) -> set[int]:
    """The inodes of the template RAM memfds QEMU ``pid`` maps."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/memfd:agentiso-tpl-"):
            out.add(int(parts[4]))
    return out


def smaps_kib(pid: int) -> dict[str, int]:
    """QEMU ``pid``'s Rss and Pss in all (KiB), and ``Rss_ram``/``Pss_ram``:
    those of its mapping of the template's RAM alone."""
    out = {"Rss": 0, "Pss": 0, "Rss_ram": 0, "Pss_ram": 0}
    ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's header line
            ram = len(head) >= 6 and head[5].startswith("/memfd:agentiso-tpl-")
        elif head and head[0] in ("Rss:", "Pss:"):
            k = head[0][:-1]
            out[k] += int(head[1])
            if ram:
                out[k + "_ram"] += int(head[1])
    return out


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    images = public_tmpdir("agentiso-tpl-img-")  # a rebuild cannot change it under us
    try:
        pin_image(IMAGES / "minimal", images / "minimal")
        with running_helper(group=0, extra_args=("--images-dir", str(images)),
                            config=CONFIG) as helper:
            lab = Lab(helper=helper, images=images, host=NetNs(helper.netns))
            lab.create("cold", USER_A)  # no template yet: boots, and one is built
            assert lab.claims() == 0
            lab.wait_template()
            with lab.client() as c:
                c.request(hp.VmStop(id=0, name="cold", owner=USER_A, force=True))
            lab.create("a1", USER_A)
            lab.create("b1", USER_B)
            print("create -> first exec (s):", {k: round(v, 2) for k, v in lab.create_s.items()})
            yield lab
    finally:
        shutil.rmtree(images, ignore_errors=True)


def test_starts_of_fresh_volumes_resume_the_template(lab: Lab) -> None:
    assert lab.claims() == 2  # a1 and b1
    for vm in ("a1", "b1"):  # the template's processes: the agent is not new
        uptime = float(lab.sh(vm, "cut -d' ' -f1 /proc/uptime"))
        assert uptime > lab.create_s[vm], (vm, uptime)


def test_two_from_one_template_differ_in_identity(lab: Lab) -> None:
    seen: dict[str, set[str]] = {"addr": set(), "mac": set(), "host": set(), "mid": set(),
                                 "rand": set()}
    for vm in ("a1", "b1"):
        net = lab.info[vm].network
        assert net is not None
        out = lab.sh(vm, "hostname; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1"
                         " | tr -d ' \\n'; echo; ip -o link show eth0; ip -o -4 addr show eth0"
                     ).splitlines()
        hostname, machine_id, rand, link, addr = out
        assert hostname == vm
        assert net.mac in link.lower() and f"inet {net.address}/" in addr, (vm, link, addr)
        assert len(machine_id) == 32 and len(rand) == 64
        for k, v in (("addr", net.address), ("mac", net.mac), ("host", hostname),
                     ("mid", machine_id), ("rand", rand)):
            seen[k].add(v)
    assert all(len(s) == 2 for s in seen.values()), seen


def test_a_write_in_one_never_shows_in_another(lab: Lab) -> None:
    assert lab.helper.proc is not None
    rams = template_rams(lab.helper.proc.pid)
    # share_memory: the template's RAM, held by the helper, one copy per user
    assert len(rams) == 2, rams
    # Disk, RAM (a tmpfs file of a few MiB) and kernel state (a sysctl).
    lab.sh("a1", "echo secret-of-a > /root/mine; echo x >> /etc/motd; sync;"
                 " head -c 8M /dev/urandom > /dev/shm/big;"
                 " echo a1dom > /proc/sys/kernel/domainname")
    assert lab.sh("b1", "test -e /root/mine && echo yes || echo no") == "no"
    lab.create("b2", USER_B)  # made after the write, from the same template
    assert lab.claims() == 3
    for vm in ("b1", "b2"):
        assert lab.sh(vm, "test -e /root/mine && echo yes || echo no") == "no", vm
        assert "x" not in lab.sh(vm, "cat /etc/motd").splitlines(), vm
        assert lab.sh(vm, "ls /dev/shm; cat /proc/sys/kernel/domainname") == "(none)", vm
    assert template_rams(lab.helper.proc.pid) == rams  # the template's RAM is unchanged


def test_the_template_ram_cannot_be_written_and_clones_share_it(lab: Lab) -> None:
    assert lab.helper.proc is not None
    rams = template_rams(lab.helper.proc.pid)
    assert len(rams) == 2, rams  # one per user: pages are never shared across users
    path = next(iter(rams))
    fd = os.open(path, os.O_RDWR)  # as a clone's QEMU opens it (mem-path=/proc/self/fd/N)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK,
                     fcntl.F_SEAL_SEAL):
            assert seals & seal, (seals, seal)
        size = os.fstat(fd).st_size
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size // 2)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: no unsealing
    finally:
        os.close(fd)
    lab.create("a2", USER_A)  # a1's sibling: they share the user's copy of the RAM
    clones = []
    for pid in lab.helper.qemu_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(b"memory-backend-file" in a and b"share=off" in a for a in argv):
            clones.append(pid)
    assert len(clones) >= 3, clones  # a1, a2 and b1 at least
    maps = {pid: ram_inodes(pid) for pid in clones}
    assert all(len(m) == 1 for m in maps.values()), maps
    assert len(set().union(*maps.values())) == 2, maps  # A's copy and B's copy
    shared = 0
    for pid in clones:
        kib = smaps_kib(pid)
        print(f"clone QEMU {pid}: PSS {kib['Pss'] // 1024} MiB, RSS {kib['Rss'] // 1024} MiB;"
              f" its template RAM mapping: PSS {kib['Pss_ram'] // 1024} MiB,"
              f" RSS {kib['Rss_ram'] // 1024} MiB")
        shared += kib["Pss_ram"] < kib["Rss_ram"] - 8 * 1024  # RAM pages shared with a sibling
    assert shared >= 2, "a1 and a2 share their RAM's unchanged pages"
    for path in rams:  # the RAM each user's clones map, in the helper's memory once
        print(f"{path}: {os.stat(path).st_blocks // 2048} MiB of RAM held")
    with lab.client() as c:
        c.request(hp.VmStop(id=0, name="a2", owner=USER_A, force=True))
    with lab.client() as c:
        c.request(hp.VmStop(id=0, name="b2", owner=USER_B, force=True))


def test_they_cannot_reach_each_other(lab: Lab) -> None:
    probe = Path(netns_mod.__file__).read_bytes()

    async def setup() -> None:
        for vm in ("a1", "b1"):
            async with open_guest(str(lab.helper.socket), vm, owner=lab.owner[vm]) as g:
                await g.upload_bytes(probe, PROBE)
                if vm == "b1":
                    await g.job_start(shell=f"python3 {PROBE} serve banner {PORT}")

    anyio.run(setup)
    b1 = lab.address("b1")
    for _ in range(60):  # the host reaches it: the server runs, the port is open
        if lab.host.probe("tcp", b1, str(PORT), "3").returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the server in b1 is not reachable from the host")
    reach = f"python3 {PROBE} tcp {b1} {PORT} 3 && echo reached || echo blocked"
    assert lab.sh("a1", reach, check=False).splitlines()[-1] == "blocked"


def test_a_qemu_killed_mid_claim_leaves_nothing_and_the_retry_succeeds(lab: Lab) -> None:
    with lab.client() as c:
        c.request(hp.VolumeCreate(id=0, name="k1-vol", owner=USER_A,
                                  source=hp.FromImage(image="minimal")))
    before_pids = set(lab.helper.qemu_pids())
    outcome: dict[str, Any] = {}

    def start() -> None:
        try:
            with lab.client() as c:
                outcome["info"] = c.request(hp.VmStart(id=0, name="k1", volume="k1-vol",
                                                       network=POLICY, owner=USER_A))
        except RemoteError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=start)
    t.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and t.is_alive():
        for pid in set(lab.helper.qemu_pids()) - before_pids:
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.005)
    t.join(120)
    assert killed is not None, outcome
    assert "error" in outcome, outcome  # its QEMU died under it: the start failed
    with lab.client() as c:
        vms = c.request(hp.VmList(id=0, owner=USER_A))
        assert isinstance(vms, hp.Vms) and "k1" not in {v.name for v in vms.vms}
    assert set(lab.helper.qemu_pids()) == before_pids  # nothing left running
    claims = lab.claims()
    with lab.client() as c:  # the same volume, again: it resumes the template
        info = c.request(hp.VmStart(id=0, name="k1", volume="k1-vol", network=POLICY,
                                    owner=USER_A))
    assert isinstance(info, hp.VmInfo) and info.state == "running"
    lab.info["k1"], lab.owner["k1"] = info, USER_A
    assert lab.sh("k1", "hostname") == "k1"
    assert lab.claims() == claims + 1
    with lab.client() as c:
        c.request(hp.VmStop(id=0, name="k1", owner=USER_A, force=True))


def test_a_changed_image_is_not_served_by_the_stale_template(lab: Lab) -> None:
    old = set(lab.templates())
    # A rebuilt image: another rootfs hash in its manifest (same bytes: the
    # helper keys templates by the manifest's hashes).
    manifest = lab.images / "minimal" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["rootfs.img"]["sha256"] = "0" * 64
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(manifest)
    claims = lab.claims()
    lab.create("c1", USER_A)
    assert lab.claims() == claims  # booted cold
    new = lab.wait_template(not_in=old)
    lab.create("c2", USER_A)
    assert lab.claims() == claims + 1  # from the new template
    assert new not in old


def test_after_a_helper_restart_the_ram_comes_from_the_state_file(lab: Lab) -> None:
    """The RAM memfds die with the helper; the next claim loads the copy from
    the template's state file, and the clone resumes on it."""
    lab.helper.stop()
    lab.helper.start()
    claims = lab.claims()
    lab.create("r1", USER_A)
    assert lab.claims() == claims + 1
    assert lab.sh("r1", "hostname") == "r1"
    assert lab.helper.proc is not None
    assert len(template_rams(lab.helper.proc.pid)) == 1  # USER_A's, loaded again
    with lab.client() as c:
        c.request(hp.VmStop(id=0, name="r1", owner=USER_A, force=True))


def ram_owners(pid: int) -> list[int]:
    """The owners of the template RAM copies the helper ``pid`` holds."""
    return [int(name.split()[0].rsplit("-", 1)[1]) for name in ram_fds(pid).values()]


def test_a_users_ram_copy_is_kept_ram_keep_s_after_their_last_vm(lab: Lab) -> None:
    """Kept: the user's next create within ``ram_keep_s`` does not read the
    whole RAM again; then dropped, so an idle user costs no host memory."""
    assert lab.helper.proc is not None
    pid = lab.helper.proc.pid
    lab.create("u1", USER_C)
    assert USER_C in ram_owners(pid)
    with lab.client() as c:
        c.request(hp.VmStop(id=0, name="u1", owner=USER_C, force=True))
    stopped = time.monotonic()
    assert USER_C in ram_owners(pid)  # kept for a next create
    while USER_C in ram_owners(pid):
        assert time.monotonic() - stopped < RAM_KEEP_S + 15, ram_owners(pid)
        time.sleep(0.2)
    gone = time.monotonic() - stopped
    # Not before its time, less one prune interval (max(ram_keep_s / 4, 1 s)):
    # the user was last seen running at most that long before the stop.
    assert gone >= RAM_KEEP_S - 1.5, gone
    assert USER_A in ram_owners(pid)  # a user who runs VMs keeps theirs
