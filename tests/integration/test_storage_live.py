"""Snapshots of a volume a real QEMU holds open, through the two-step API.

QEMU runs paused (``-S``, no guest code, no CPU cost) with the volume attached
to a virtio-blk device exactly as the VM engine will attach it, so QEMU holds
the image locks a running VM holds.  Guest writes are simulated with HMP
``qemu-io`` on the device, which writes through the device's current top.
The live snapshot is the sequence the VM engine will run:
``prepare_snapshot`` -> (qcow2: QMP ``blockdev-add`` + ``blockdev-snapshot``)
-> ``commit_snapshot``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from qemu.qmp import QMPClient

from agentiso.privhelper.storage import Attachment, FromBase, VolumeBackend, ZfsConfig
from agentiso.privhelper.storage.errors import VolumeBusy
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.zfs import ZfsBackend
from tests.harness.zfs import ZfsPool

MIB = 1024 * 1024
pytestmark = pytest.mark.anyio




@pytest.fixture(params=["qcow2", "zfs"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VolumeBackend]:
    src = tmp_path / "rootfs.img"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "raw", str(src), str(64 * MIB)])
    b: VolumeBackend
    if request.param == "qcow2":
        b = Qcow2Backend(tmp_path / "storage", min_size=MIB)
    else:
        pool: ZfsPool = request.getfixturevalue("zfs_pool")
        b = ZfsBackend(ZfsConfig(dataset=f"{pool.name}/l{secrets.token_hex(3)}"), min_size=MIB)
    await b.setup()
    try:
        await b.import_base("minimal", src)
        await b.create_volume("ws", FromBase("minimal"))
        yield b
    finally:
        if isinstance(b, ZfsBackend):
            await anyio.run_process(["zfs", "destroy", "-R", b.ds.root], check=False)


def _blockdev(att: Attachment) -> str:
    top = att.top
    spec = {
        "driver": str(top.format),
        "node-name": "vol",
        "file": {"driver": str(top.protocol), "filename": str(top.path)},
    }
    return json.dumps(spec)


class Qemu:
    def __init__(self, proc: subprocess.Popen[bytes], qmp: QMPClient) -> None:
        self.proc = proc
        self.qmp = qmp
        #: Node name of the image QEMU writes now (the engine tracks this).
        self.top_node = "vol"

    async def stop(self) -> None:
        """Quit QEMU (idempotent); kill it if QMP does not answer."""
        if self.proc.poll() is None:
            try:
                with anyio.fail_after(5):
                    await self.qmp.execute("quit")
            except Exception:
                self.proc.kill()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        await anyio.to_thread.run_sync(self.proc.wait, 10)

    async def io(self, command: str) -> str:
        out = await self.qmp.execute(
            "human-monitor-command", {"command-line": f'qemu-io -d disk0 "{command}"'}
        )
        assert isinstance(out, str)
        assert "fail" not in out.lower() and "error" not in out.lower(), out
        return out


@pytest.fixture
async def qemu(backend: VolumeBackend, tmp_path: Path) -> AsyncIterator[Qemu]:
    att = await backend.attachment("ws")
    sock = tmp_path / "qmp.sock"
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-S", "-nodefaults", "-no-user-config",
        "-display", "none", "-accel", "tcg", "-m", "64",
        "-blockdev", _blockdev(att),
        "-device", "virtio-blk-device,drive=vol,id=disk0",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
    qmp = QMPClient("storage-test")
    try:
        # Wait for the socket itself (QEMU under load may take seconds to make it).
        with anyio.fail_after(60):
            while not sock.exists() and proc.poll() is None:
                await anyio.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        await qmp.connect(str(sock))
        vm = Qemu(proc, qmp)
        yield vm
    finally:
        await Qemu(proc, qmp).stop()


async def _live_snapshot(backend: VolumeBackend, qemu: Qemu, name: str) -> None:
    plan = await backend.prepare_snapshot("ws", name)
    try:
        if plan.new_top is not None:
            node = f"snap-{name}"
            await qemu.qmp.execute(
                "blockdev-add",
                {
                    "driver": str(plan.new_top.format),
                    "node-name": node,
                    "file": {
                        "driver": str(plan.new_top.protocol),
                        "filename": str(plan.new_top.path),
                    },
                    "backing": None,
                },
            )
            await qemu.qmp.execute("blockdev-snapshot", {"node": qemu.top_node, "overlay": node})
            qemu.top_node = node
    except BaseException:
        await backend.abort_snapshot(plan)
        raise
    await backend.commit_snapshot(plan)


async def _node_for(qemu: Qemu, path: Path) -> str:
    """The QEMU node name of the qcow2 image at ``path`` (as the engine would track it)."""
    nodes = await qemu.qmp.execute("query-named-block-nodes")
    assert isinstance(nodes, list)
    for n in nodes:
        if n.get("drv") == "qcow2" and n.get("file") == str(path):
            return str(n["node-name"])
    raise AssertionError(f"no node for {path}: {nodes}")


async def _live_delete(backend: VolumeBackend, qemu: Qemu, name: str) -> None:
    plan = await backend.prepare_delete_snapshot("ws", name)
    if plan.stream_into is None:
        await backend.commit_delete_snapshot(plan)
        return
    assert plan.new_backing is not None and plan.removed is not None
    removed = await _node_for(qemu, plan.removed.path)
    await qemu.qmp.execute(
        "block-stream",
        {
            "job-id": f"delete-{name}",
            "device": await _node_for(qemu, plan.stream_into.path),
            "base-node": await _node_for(qemu, plan.new_backing.path),
            "backing-file": str(plan.new_backing.path),
        },
    )
    with anyio.fail_after(120):  # bounded by the job, not a timer: room for a loaded host
        while await qemu.qmp.execute("query-block-jobs"):
            await anyio.sleep(0.05)
    await qemu.qmp.execute("blockdev-del", {"node-name": removed})
    await backend.commit_delete_snapshot(plan, streamed=True)
    assert not plan.removed.path.exists()


async def _read(backend: VolumeBackend, pattern: int, offset: int) -> None:
    top = (await backend.attachment("ws")).top
    res = await anyio.run_process(
        [
            "qemu-io",
            "-f",
            str(top.format),
            "-c",
            f"read -P {pattern:#x} {offset} {MIB}",
            str(top.path),
        ],
        check=False,
    )
    out = (res.stdout + res.stderr).decode()
    assert res.returncode == 0 and "fail" not in out.lower(), out


async def test_live_snapshot_then_rollback(backend: VolumeBackend, qemu: Qemu) -> None:
    await qemu.io(f"write -P 0xaa 0 {MIB}")
    await qemu.qmp.execute("human-monitor-command", {"command-line": 'qemu-io -d disk0 "flush"'})
    await _live_snapshot(backend, qemu, "s1")
    await qemu.io(f"write -P 0xbb 0 {MIB}")
    await qemu.io(f"read -P 0xbb 0 {MIB}")
    await _live_snapshot(backend, qemu, "s2")
    await qemu.io(f"write -P 0xcc {MIB} {MIB}")

    # While QEMU holds the volume, offline operations are refused, typed.
    with pytest.raises(VolumeBusy):
        await backend.rollback("ws", "s1")
    with pytest.raises(VolumeBusy):
        await backend.destroy_volume("ws")
    with pytest.raises(VolumeBusy):
        await backend.grow_volume("ws", 128 * MIB)
    if isinstance(backend, Qcow2Backend):
        # An offline merge would rewrite the file QEMU writes: refused.
        with pytest.raises(VolumeBusy):
            await backend.delete_snapshot("ws", "s2")

    # Deleting the newest snapshot live: qcow2 has QEMU stream the layer into the
    # top (block-stream); ZFS just destroys the snapshot.
    await _live_delete(backend, qemu, "s2")
    assert [s.name for s in (await backend.volume_info("ws")).snapshots] == ["s1"]
    await qemu.io(f"read -P 0xbb 0 {MIB}")
    await qemu.io(f"read -P 0xcc {MIB} {MIB}")

    await qemu.stop()
    await _read(backend, 0xBB, 0)
    await _read(backend, 0xCC, MIB)
    await backend.rollback("ws", "s1")
    await _read(backend, 0xAA, 0)
    await _read(backend, 0x00, MIB)
    assert [s.name for s in (await backend.volume_info("ws")).snapshots] == ["s1"]
