"""Workspace VMs through the real helper: real QEMU (TCG), the real guest
image and agent, the relay, unprivileged users.

Covers issue 4's acceptance: start -> exec through the relay -> stop; QEMU
runs as a non-root uid; crash detection with the console tail; kill -9 of the
helper leaves VMs running and the restarted helper adopts them; one uid
cannot see or touch another's VM; limits refuse with a typed error and create
nothing; snapshot/rollback/clone with the guest's files.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from agentiso.frontend.guest_channel import open_guest
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import Conflict, LimitExceeded, NotFound, Unavailable
from tests.harness.images import skip_unless_image
from tests.support.helper_process import IMAGES, HelperProcess, run_as, running_helper

GROUP = 64341
ALICE = 64342
BOB = 64343
pytestmark = skip_unless_image("minimal")


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    config = "[limits]\nper_uid_memory_mib = 1024\nper_uid_vms = 3\n"
    with running_helper(
        group=GROUP, extra_args=("--images-dir", str(IMAGES)), config=config
    ) as h:
        yield h


def client(helper: HelperProcess) -> BlockingHelperClient:
    return BlockingHelperClient(str(helper.socket), timeout=180)


def guest_sh(helper: HelperProcess, vm: str, cmd: str) -> bytes:
    """Run ``cmd`` in the VM through the relay (as root's client)."""

    async def run() -> bytes:
        async with open_guest(str(helper.socket), vm) as g:
            r = await g.exec(shell=cmd)
            assert r.exit_code == 0, r
            return r.stdout

    return anyio.run(run)


def guest_sh_as(helper: HelperProcess, vm: str, cmd: str, owner: int) -> bytes:
    """Root opening another owner's VM (administration)."""

    async def run() -> bytes:
        async with open_guest(str(helper.socket), vm, owner=owner) as g:
            return (await g.exec(shell=cmd)).stdout

    return anyio.run(run)


def start(c: BlockingHelperClient, vm: str, volume: str, image: str = "minimal") -> hp.VmInfo:
    try:
        c.request(hp.VolumeGet(id=0, name=volume))
    except NotFound:
        c.request(hp.VolumeCreate(id=0, name=volume, source=hp.FromImage(image=image)))
    info = c.request(hp.VmStart(id=0, name=vm, volume=volume))
    assert isinstance(info, hp.VmInfo) and info.state == "running", info
    return info


def qemu_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


USER_SESSION = textwrap.dedent(
    """
    import anyio, json, sys
    from agentiso.frontend.guest_channel import open_guest
    from agentiso.protocol import helper as hp
    from agentiso.protocol.blocking import BlockingHelperClient
    from agentiso.protocol.errors import RemoteError
    SOCK = {sock!r}
    c = BlockingHelperClient(SOCK, timeout=180)
    def out(x): print(json.dumps(x), flush=True)
    def call(msg):
        try:
            return type(c.request(msg)).__name__
        except RemoteError as e:
            return e.code
    async def sh(vm, cmd):
        try:
            async with open_guest(SOCK, vm) as g:
                r = await g.exec(shell=cmd)
                return r.stdout.decode()
        except RemoteError as e:
            return e.code
    """
)


def as_user(helper: HelperProcess, uid: int, code: str) -> list[object]:
    prog = USER_SESSION.format(sock=str(helper.socket)) + textwrap.dedent(code)
    r = run_as(uid, uid, [GROUP], prog, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_unprivileged_user_runs_a_vm_others_cannot_touch(helper: HelperProcess) -> None:
    res = as_user(helper, ALICE, """
        c.request(hp.VolumeCreate(id=0, name="ws", source=hp.FromImage(image="minimal")))
        out(c.request(hp.VmStart(id=0, name="box", volume="ws")).state)
        out(anyio.run(sh, "box", "echo hello from $(hostname -s 2>/dev/null || echo vm); id -u"))
    """)
    assert res[0] == "running"
    assert "hello from" in str(res[1]) and str(res[1]).strip().endswith("0")
    # QEMU runs as neither root nor the user.
    pids = helper.qemu_pids()
    assert pids and all(qemu_uid(p) not in (0, ALICE) for p in pids)
    # Bob cannot see, open, snapshot or stop Alice's VM, even by its name.
    res = as_user(helper, BOB, """
        out(call(hp.VmGet(id=0, name="box")))
        out(anyio.run(sh, "box", "true"))
        out(call(hp.VmStop(id=0, name="box", force=True)))
        out(call(hp.VmConsole(id=0, name="box")))
        out(call(hp.SnapshotCreate(id=0, volume="ws", snapshot="x")))
        out([v.name for v in c.request(hp.VmList(id=0)).vms])
    """)
    assert res == ["not_found"] * 5 + [[]]
    # Only root may act for another owner.
    res = as_user(helper, BOB, f"""
        out(call(hp.VmGet(id=0, name="box", owner={ALICE})))
        out(call(hp.VmStop(id=0, name="box", owner={ALICE}, force=True)))
        try:
            async def peek():
                async with open_guest(SOCK, "box", owner={ALICE}):
                    return "opened"
            out(anyio.run(peek))
        except RemoteError as e:
            out(e.code)
    """)
    assert res == ["permission_denied"] * 3
    with client(helper) as c:
        info = c.request(hp.VmGet(id=0, name="box", owner=ALICE))
        assert isinstance(info, hp.VmInfo) and info.state == "running"
    assert guest_sh_as(helper, "box", "hostname", owner=ALICE) == b"box\n"
    res = as_user(helper, ALICE, """
        out(c.request(hp.VmGet(id=0, name="box")).state)
        out(call(hp.VolumeDestroy(id=0, name="ws")))  # in use
        out(call(hp.VmStop(id=0, name="box")))
        out(call(hp.VolumeDestroy(id=0, name="ws")))
        out([v.name for v in c.request(hp.VmList(id=0)).vms])
    """)
    assert res == ["running", "conflict", "Done", "Done", []]
    assert helper.qemu_pids() == []


def test_vm_limits_refuse_and_create_nothing(helper: HelperProcess) -> None:
    with client(helper) as c:
        c.request(hp.VolumeCreate(id=0, name="lim", source=hp.FromImage(image="minimal")))
        with pytest.raises(LimitExceeded):
            c.request(hp.VmStart(id=0, name="huge", volume="lim", memory_mib=2048))
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and vms.vms == []
        c.request(hp.VolumeDestroy(id=0, name="lim"))
    assert helper.qemu_pids() == []


def test_crash_is_detected_with_console_tail(helper: HelperProcess) -> None:
    with client(helper) as c:
        start(c, "crashy", "crashy-vol")
        pids = helper.qemu_pids()
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            info = c.request(hp.VmGet(id=0, name="crashy"))
            assert isinstance(info, hp.VmInfo)
            if info.state == "crashed":
                break
            assert time.monotonic() - t0 < 2, "crash not detected within a second or two"
            time.sleep(0.05)
        assert "signal 9" in info.reason and "console" in info.reason
        assert "Linux version" in info.reason or "agentiso" in info.reason
        with pytest.raises(Unavailable):
            guest_sh(helper, "crashy", "true")
        c.request(hp.VmStop(id=0, name="crashy"))
        c.request(hp.VolumeDestroy(id=0, name="crashy-vol"))


def test_helper_kill9_leaves_vms_running_and_restarted_helper_adopts_them(
    helper: HelperProcess,
) -> None:
    with client(helper) as c:
        start(c, "survivor", "survivor-vol")
    assert guest_sh(helper, "survivor", "echo before > /root/mark; cat /root/mark") == b"before\n"
    pids = helper.qemu_pids()
    helper.kill9()
    assert helper.qemu_pids() == pids  # QEMU outlived the helper
    helper.start()
    with client(helper) as c:
        info = c.request(hp.VmGet(id=0, name="survivor"))
        assert isinstance(info, hp.VmInfo) and info.state == "running"
    assert guest_sh(helper, "survivor", "cat /root/mark; echo after") == b"before\nafter\n"
    assert '"adopted"' in helper.log()
    with client(helper) as c:
        c.request(hp.VmStop(id=0, name="survivor"))
        c.request(hp.VolumeDestroy(id=0, name="survivor-vol"))
    assert helper.qemu_pids() == []


def test_snapshot_of_a_running_vm_rollback_and_clone(helper: HelperProcess) -> None:
    with client(helper) as c:
        start(c, "orig", "orig-vol")
        guest_sh(helper, "orig", "echo one > /root/f")
        # Taken while the VM runs: the guest syncs and freezes around it.
        snap = c.request(hp.SnapshotCreate(id=0, volume="orig-vol", snapshot="s1"))
        assert isinstance(snap, hp.VolumeInfo) and [s.name for s in snap.snapshots] == ["s1"]
        guest_sh(helper, "orig", "echo two > /root/f; sync")
        # Fork s1 into a second VM while the first runs.
        c.request(hp.VolumeCreate(
            id=0, name="fork-vol", source=hp.FromSnapshot(volume="orig-vol", snapshot="s1")))
        start(c, "fork", "fork-vol")
        assert guest_sh(helper, "fork", "cat /root/f") == b"one\n"
        assert guest_sh(helper, "orig", "cat /root/f") == b"two\n"
        with pytest.raises(Conflict):  # rollback needs the VM stopped
            c.request(hp.SnapshotRollback(id=0, volume="orig-vol", snapshot="s1"))
        c.request(hp.VmStop(id=0, name="orig"))
        c.request(hp.SnapshotRollback(id=0, volume="orig-vol", snapshot="s1"))
        start(c, "orig", "orig-vol")
        assert guest_sh(helper, "orig", "cat /root/f") == b"one\n"
        for vm in ("orig", "fork"):
            c.request(hp.VmStop(id=0, name=vm))
        c.request(hp.VolumeDestroy(id=0, name="fork-vol"))
        c.request(hp.SnapshotDelete(id=0, volume="orig-vol", snapshot="s1"))
        c.request(hp.VolumeDestroy(id=0, name="orig-vol"))
    assert helper.qemu_pids() == []


def test_memory_snapshot_keeps_processes_running(helper: HelperProcess) -> None:
    with client(helper) as c:
        start(c, "mem", "mem-vol")
        pid = guest_sh(helper, "mem", "sleep 1000 >/dev/null 2>&1 & echo $!").strip().decode()
        guest_sh(helper, "mem", "echo before > /root/f")
        snap = c.request(hp.SnapshotCreate(id=0, volume="mem-vol", snapshot="m1", memory=True))
        assert isinstance(snap, hp.VolumeInfo) and snap.snapshots[0].memory
        # The VM runs on after the snapshot.
        guest_sh(helper, "mem", "echo after > /root/f; sync")
        c.request(hp.VmStop(id=0, name="mem"))
        info = c.request(hp.VmStart(id=0, name="mem", volume="mem-vol", resume_snapshot="m1"))
        assert isinstance(info, hp.VmInfo) and info.state == "running"
        # The process started before the snapshot is still there; the disk is
        # as at the snapshot.
        assert guest_sh(helper, "mem", f"kill -0 {pid} && echo alive") == b"alive\n"
        assert guest_sh(helper, "mem", "cat /root/f") == b"before\n"
        c.request(hp.VmStop(id=0, name="mem"))
        c.request(hp.SnapshotDelete(id=0, volume="mem-vol", snapshot="m1"))
        c.request(hp.VolumeDestroy(id=0, name="mem-vol"))
    assert helper.qemu_pids() == []
    assert list((helper.state_dir / "memory").iterdir()) == []
