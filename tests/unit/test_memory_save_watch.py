"""The watch on a memory save (LiveSnapshots._save_memory): a state file
growing past what the VM's RAM explains is cut off, and a save that failed
with the state filesystem full is a typed StateFilesystemFull.  QEMU is a
stand-in here (what it writes is the input); the watch is the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from agentiso.privhelper.errors import HelperError
from agentiso.privhelper.registry import VmRecord
from agentiso.privhelper.storage import quotas
from agentiso.privhelper.vms import snapshots as snaps
from agentiso.protocol.errors import ErrorCode

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


class Qemu:
    """Writes a state of ``size`` bytes to the fd, ``step`` at a time."""

    def __init__(self, size: int, step: int = 8 * MIB, fail: HelperError | None = None) -> None:
        self.size, self.step, self.fail = size, step, fail
        self.cancelled = False

    async def save_memory(self, key: str, fd: int) -> None:
        try:
            written = 0
            while written < self.size:
                written = min(self.size, written + self.step)
                os.ftruncate(fd, written)  # st_size grows, no disk used
                await anyio.sleep(0.01)
            if self.fail is not None:
                raise self.fail
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


def live(tmp: Path, qemu: Qemu) -> snaps.LiveSnapshots:
    ws: Any = SimpleNamespace(memory_dir=tmp)
    return snaps.LiveSnapshots(ws=ws, engine=qemu, channels=None, network=None)  # type: ignore[arg-type]


def vm(memory_mib: int) -> VmRecord:
    return VmRecord(key="m0", owner=1, name="box", volume_key="v0", vcpus=1,
                    memory_mib=memory_mib, created=0.0)


async def save(tmp: Path, qemu: Qemu, memory_mib: int) -> None:
    fd = os.open(tmp / "state.mem", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await live(tmp, qemu)._save_memory(vm(memory_mib), fd)
    finally:
        os.close(fd)


async def test_a_state_within_the_bound_is_saved(tmp_path: Path) -> None:
    qemu = Qemu(64 * MIB)
    await save(tmp_path, qemu, 64)
    assert not qemu.cancelled and (tmp_path / "state.mem").stat().st_size == 64 * MIB


async def test_a_state_growing_past_the_vms_ram_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snaps, "MEMORY_WATCH_S", 0.01)
    qemu = Qemu(10 * 1024 * MIB)  # a compromised QEMU filling the disk
    with anyio.fail_after(20):
        with pytest.raises(quotas.QuotaExceeded) as e:
            await save(tmp_path, qemu, 64)
    assert qemu.cancelled
    assert e.value.code is ErrorCode.LIMIT_EXCEEDED and "64 MiB of RAM" in e.value.message
    bound = quotas.memory_state_bound(64)
    assert (tmp_path / "state.mem").stat().st_size < bound + 64 * MIB


async def test_a_save_failed_on_a_full_filesystem_is_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = HelperError("saving the memory of m0 ended failed", ErrorCode.UNAVAILABLE)
    monkeypatch.setattr(quotas, "free_bytes", lambda path: 4096)
    with pytest.raises(quotas.StateFilesystemFull):
        await save(tmp_path, Qemu(MIB, fail=failed), 64)
    # With room left, the engine's own error stands.
    monkeypatch.setattr(quotas, "free_bytes", lambda path: 10 * 1024 * MIB)
    with pytest.raises(HelperError) as e:
        await save(tmp_path, Qemu(MIB, fail=failed), 64)
    assert e.value is failed
