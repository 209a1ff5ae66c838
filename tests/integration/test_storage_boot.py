"""The real guest image boots from a volume of each backend, and grows with it.

The ``minimal`` image's rootfs.img is imported as a base, a volume is made from
it and grown with :meth:`grow_volume`, and a microVM (TCG) started by the real VM
engine (:func:`tests.harness.engine.engine_vm`) boots from exactly what
:meth:`attachment` names (qcow2 chain / raw file on zfs-fuse), every node of the
chain a disk layer, as the helper attaches a volume.  The guest's
init grows the root filesystem to the disk (resize2fs) and says so on the
console; afterwards the ext4 superblock *in the volume* shows the new size while
a fresh volume from the same base still shows the image's.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from agentiso.privhelper.storage import Attachment, FromBase, VolumeBackend, ZfsConfig
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.zfs import ZfsBackend
from agentiso.privhelper.vm.spec import DiskLayer
from tests.harness.engine import engine_vm
from tests.harness.images import ImageInfo, require_image
from tests.harness.zfs import ZfsPool

MIB = 1024 * 1024
GROWN = 1024 * MIB
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def image() -> ImageInfo:
    return require_image("minimal")  # skips with the reason if not built




@pytest.fixture(params=["qcow2", "zfs"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, image: ImageInfo
) -> AsyncIterator[VolumeBackend]:
    b: VolumeBackend
    if request.param == "qcow2":
        b = Qcow2Backend(tmp_path / "storage", min_size=MIB)
    else:
        pool: ZfsPool = request.getfixturevalue("zfs_pool")
        b = ZfsBackend(ZfsConfig(dataset=f"{pool.name}/b{secrets.token_hex(3)}"), min_size=MIB)
    await b.setup()
    try:
        await b.import_base("minimal", image.rootfs)
        yield b
    finally:
        if isinstance(b, ZfsBackend):
            await anyio.run_process(["zfs", "destroy", "-R", b.ds.root], check=False)


def boot_volume(att: Attachment) -> tuple[int, str]:
    """Boot the image's kernel from the volume until its init has grown the root
    filesystem; then stop the VM cleanly (QEMU flushes its qcow2 metadata).
    Returns the size init reported (MiB) and the console's tail."""
    layers = tuple(
        DiskLayer(format=n.format.value, path=str(n.path), read_only=n.read_only)
        for n in att.chain
    )
    with engine_vm("minimal", disks=layers) as vm:
        found = vm.wait_for_console(r"root filesystem grown to (\d+) MiB", 120)
        tail = vm.tail()
        # The minimal image ignores the ACPI button: on to QMP quit at once.
        vm.shut_down(powerdown_timeout=1.0)
    return int(found.group(1)), tail


async def fs_bytes(att: Attachment, tmp: Path) -> int:
    """Size of the ext4 filesystem recorded in the volume's superblock."""
    out = tmp / f"head-{secrets.token_hex(3)}"
    top = att.top
    await anyio.run_process(
        ["qemu-img", "dd", "-f", str(top.format), "-O", "raw", "bs=4096", "count=1",
         f"if={top.path}", f"of={out}"]
    )  # fmt: skip
    sb = out.read_bytes()[1024:2048]
    out.unlink()
    assert struct.unpack_from("<H", sb, 56)[0] == 0xEF53, "no ext4 superblock"
    # s_blocks_count_lo @4, s_log_block_size @24, s_blocks_count_hi @0x150.
    blocks_lo: int = struct.unpack_from("<I", sb, 4)[0]
    log_block: int = struct.unpack_from("<I", sb, 24)[0]
    blocks_hi: int = struct.unpack_from("<I", sb, 0x150)[0]
    return ((blocks_hi << 32) | blocks_lo) * (1024 << log_block)


async def test_boot_grown_volume(backend: VolumeBackend, image: ImageInfo, tmp_path: Path) -> None:
    await backend.create_volume("ws", FromBase("minimal"))
    info = await backend.grow_volume("ws", GROWN)
    assert info.virtual_size == GROWN
    att = await backend.attachment("ws")
    original = await fs_bytes(att, tmp_path)
    assert original < GROWN

    grown_mib, tail = await anyio.to_thread.run_sync(boot_volume, att)
    assert grown_mib == GROWN // MIB, tail

    # The guest wrote the grown filesystem into the volume, not into the base.
    grown = await fs_bytes(att, tmp_path)
    assert GROWN - 64 * MIB < grown <= GROWN
    await backend.create_volume("fresh", FromBase("minimal"))
    assert await fs_bytes(await backend.attachment("fresh"), tmp_path) == original
    assert (await backend.volume_info("ws")).used_bytes > 0
