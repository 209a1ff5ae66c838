"""Memory snapshots (save, restore) and live overlay switching of one VM.

Everything here talks to QEMU through the VM's supervisor (the same QMP path,
with reconnect, as every other command) and waits for migrations on QEMU's
MIGRATION events.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Literal

import anyio
import msgspec
import structlog

from ..cmdline import ROOT_DISK_NODE
from ..errors import InvalidVmSpec, LaunchError, VmError, VmUnavailable
from ..record import VmRecord
from ..spec import DiskLayer, check_path
from .supervisor import VmSupervisor
from .types import MIB, MemorySaveResult, VmState

log = structlog.get_logger("agentiso.helper.vm")

MEMORY_FDNAME = "agentiso-memory"
INCOMING_FDNAME = "agentiso-incoming"
#: Migration to a local file is bounded by the disk, not a network: no throttle
#: (QEMU's default is 32 MiB/s).
MIGRATE_MAX_BANDWIDTH = 64 * 1024 * MIB
_EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}


async def save_memory(vm: VmSupervisor, fd: int, timeout: float) -> MemorySaveResult:
    """Pause the VM and write its whole state to ``fd`` (QMP ``migrate`` to an fd).

    The VM stays paused afterwards (see ``VmEngine.save_memory``).
    """
    vm.require(VmState.RUNNING, VmState.PAUSED, to="save its memory")
    t0 = time.monotonic()
    start_size = os.fstat(fd).st_size
    await vm.execute("stop")
    vm.transition(VmState.PAUSED, only_from=(VmState.RUNNING, VmState.PAUSED))
    await vm.execute("migrate-set-capabilities", _EVENTS_ON)
    await vm.execute("migrate-set-parameters", {"max-bandwidth": MIGRATE_MAX_BANDWIDTH})
    await vm.pass_fd(fd, MEMORY_FDNAME)
    vm.expect_migration()
    await vm.execute("migrate", {"uri": f"fd:{MEMORY_FDNAME}"})
    try:
        status = await vm.wait_migration(timeout)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(VmError):
            await vm.execute("migrate_cancel")
        raise
    if status != "completed":
        raise VmUnavailable(f"saving the memory of {vm.name} ended {status}")
    await _runstate_settled(vm, timeout)
    return MemorySaveResult(os.fstat(fd).st_size - start_size, time.monotonic() - t0)


async def restore_memory(vm: VmSupervisor, fd: int, timeout: float) -> None:
    """Load a saved state into a QEMU started with ``-incoming defer`` (still paused)."""
    await vm.execute("migrate-set-capabilities", _EVENTS_ON)
    await vm.pass_fd(fd, INCOMING_FDNAME)
    vm.expect_migration()
    await vm.execute("migrate-incoming", {"uri": f"fd:{INCOMING_FDNAME}"})
    status = await vm.wait_migration(timeout)
    if status != "completed":
        raise LaunchError(f"restoring memory ended {status}")
    await _runstate_settled(vm, timeout)


#: Run states QEMU passes through while it finishes a migration: ``cont`` is
#: refused in them ("Migration is not finalized yet").
_MIGRATING_RUNSTATES = ("finish-migrate", "inmigrate")


async def _runstate_settled(vm: VmSupervisor, timeout: float) -> None:
    """Wait until QEMU has left the migration run states.  The MIGRATION
    event says "completed" a moment before the run state changes (the
    migration thread finishes after announcing it), and a ``cont`` in that
    moment fails; a loaded host makes the moment long enough to hit."""
    with anyio.fail_after(timeout):
        while True:
            info = await vm.execute("query-status")
            if not isinstance(info, dict) or info.get("status") not in _MIGRATING_RUNSTATES:
                return
            await anyio.sleep(0.01)


async def switch_to_overlay(
    vm: VmSupervisor, path: str, fmt: Literal["qcow2"], timeout: float
) -> VmRecord:
    """Make a running VM write to a new top layer ``path``; returns the new record.

    The helper opens ``path`` and hands QEMU the fd (``add-fd`` into a fresh
    fdset); QEMU adds it with an explicit ``backing: null`` and
    ``blockdev-snapshot`` puts it on top of the current top node.  On failure
    the added nodes and the fdset are removed again.
    """
    vm.require_alive(to="switch to a new disk overlay")
    check_path("overlay", path)
    if fmt != "qcow2":
        raise InvalidVmSpec("a live snapshot overlay must be qcow2")
    rec = vm.record
    gen = rec.overlay_generation + 1
    node, file_node = f"{ROOT_DISK_NODE}-s{gen}", f"{ROOT_DISK_NODE}-s{gen}-file"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise InvalidVmSpec(f"cannot open overlay {path}: {e.strerror}") from None
    added: list[str] = []
    fdset: int | None = None
    try:
        with anyio.fail_after(timeout):
            sets = await vm.execute("query-fdsets")
            fdset = next_fdset(sets, len(rec.spec.disks))
            await vm.add_fd(fd, fdset, f"overlay-{gen}")
            await vm.execute(
                "blockdev-add",
                {"driver": "file", "node-name": file_node,
                 "filename": f"/dev/fdset/{fdset}", "discard": "unmap"},
            )  # fmt: skip
            added.append(file_node)
            await vm.execute(
                "blockdev-add",
                {"driver": fmt, "node-name": node, "file": file_node, "backing": None,
                 "discard": "unmap", "detect-zeroes": "unmap"},
            )  # fmt: skip
            added.append(node)
            await vm.execute("blockdev-snapshot", {"node": rec.top_node, "overlay": node})
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for n in reversed(added):
                with contextlib.suppress(VmError):
                    await vm.execute("blockdev-del", {"node-name": n})
            if fdset is not None:
                with contextlib.suppress(VmError):
                    await vm.execute("remove-fd", {"fdset-id": fdset})
        raise
    finally:
        os.close(fd)
    log.info("vm_disk_overlay", vm=vm.name, node=node, fdset=fdset)
    return with_new_top(rec, DiskLayer(format=fmt, path=path), node, gen)


def next_fdset(query_fdsets: object, ours: int) -> int:
    """An fdset id above every one QEMU lists and above the ones our argv used
    (one per disk layer), from the reply to ``query-fdsets`` (checked, not trusted)."""
    used = [ours]
    if isinstance(query_fdsets, list):
        for s in query_fdsets:
            fid = s.get("fdset-id") if isinstance(s, dict) else None
            if isinstance(fid, int):
                used.append(fid)
    return max(used) + 1


def with_new_top(rec: VmRecord, top: DiskLayer, node: str, generation: int) -> VmRecord:
    """The record after a switch: ``top`` over the old chain, now all read-only."""
    old = [msgspec.structs.replace(layer, read_only=True) for layer in rec.spec.disks]
    spec = msgspec.structs.replace(rec.spec, disks=(top, *old))
    return msgspec.structs.replace(rec, spec=spec, top_node=node, overlay_generation=generation)
