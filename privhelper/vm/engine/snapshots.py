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


def migrate_capabilities(ignore_shared: bool) -> dict[str, object]:
    """``migrate-set-capabilities`` arguments.  ``x-ignore-shared`` leaves
    RAM in a shared memory file out of the stream (a template VM's save:
    the file holds it) and, on loading, keeps what the VM's memory file
    already has; both ends must agree, since it changes the stream's format."""
    caps = [{"capability": "events", "state": True}]
    if ignore_shared:
        caps.append({"capability": "x-ignore-shared", "state": True})
    return {"capabilities": caps}


async def save_memory(vm: VmSupervisor, fd: int, timeout: float) -> MemorySaveResult:
    """Pause the VM and write its whole state to ``fd`` (QMP ``migrate`` to an fd).

    The VM stays paused afterwards (see ``VmEngine.save_memory``).  A VM whose
    RAM is a shared memory file (a template VM) saves its devices without the
    RAM (``x-ignore-shared``), then the helper appends the RAM as it is at
    this paused instant (:func:`append_ram`): the file may change once the
    VM runs on, the saved copy does not.
    """
    vm.require(VmState.RUNNING, VmState.PAUSED, to="save its memory")
    mf = vm.record.spec.memory_file
    if mf is not None and mf.share and vm.adopted:
        # The fd number in the record was the previous helper's.
        raise VmUnavailable(
            f"{vm.name} runs on a shared memory file this helper did not open; "
            "stop it and start it again to save its memory")
    t0 = time.monotonic()
    start_size = os.fstat(fd).st_size
    await vm.execute("stop")
    vm.transition(VmState.PAUSED, only_from=(VmState.RUNNING, VmState.PAUSED))
    mf = vm.record.spec.memory_file
    await vm.execute("migrate-set-capabilities",
                     migrate_capabilities(mf is not None and mf.share))
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
    if mf is not None and mf.share:
        await anyio.to_thread.run_sync(append_ram, mf.fd, fd, vm.record.spec.memory_mib * MIB)
    return MemorySaveResult(os.fstat(fd).st_size - start_size, time.monotonic() - t0)


#: The RAM appended to a saved state starts on a page boundary.
RAM_ALIGN = 4096


def ram_offset(file_size: int, ram_bytes: int) -> int:
    """Where the RAM appended by :func:`append_ram` starts in a state file of
    ``file_size`` bytes (it is the file's last ``ram_bytes``)."""
    off = file_size - ram_bytes
    if off <= 0 or off % RAM_ALIGN:
        raise LaunchError(f"a saved state of {file_size} bytes holds no RAM of {ram_bytes} bytes")
    return off


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` runs of ``fd`` in ``[start, end)`` that hold
    data (holes, never written, read as zeros and are skipped)."""
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole - data))
        pos = hole
    return runs


def copy_extents(src: int, src_off: int, dst: int, dst_off: int, size: int) -> None:
    """Copy the data of ``src[src_off:src_off+size]`` to ``dst`` at
    ``dst_off``, leaving holes as holes, and make ``dst`` end there."""
    chunk = 4 * MIB
    for off, length in data_extents(src, src_off, src_off + size):
        done = 0
        while done < length:
            buf = os.pread(src, min(chunk, length - done), off + done)
            if not buf:
                raise LaunchError("the memory file ended early while copying it")
            os.pwrite(dst, buf, dst_off + (off - src_off) + done)
            done += len(buf)
    if os.fstat(dst).st_size < dst_off + size:
        os.ftruncate(dst, dst_off + size)


def append_ram(ram_fd: int, state_fd: int, ram_bytes: int) -> None:
    """Append the RAM file ``ram_fd`` to the saved state in ``state_fd``, page
    aligned, holes kept (see :func:`ram_offset`)."""
    try:
        if os.fstat(ram_fd).st_size != ram_bytes:  # not the VM's RAM file any more
            raise VmUnavailable("the VM's memory file is not its RAM: it was closed early; "
                                "keep it open while the VM runs")
        end = os.fstat(state_fd).st_size
        off = -(-end // RAM_ALIGN) * RAM_ALIGN
        copy_extents(ram_fd, 0, state_fd, off, ram_bytes)
    except OSError as exc:
        raise VmUnavailable(f"appending the VM's RAM to its saved state failed: {exc}; "
                            "check the memory directory's space") from None


async def restore_memory(vm: VmSupervisor, fd: int, timeout: float) -> None:
    """Load a saved state into a QEMU started with ``-incoming defer`` (still
    paused).  A VM with a memory file loads a state saved with
    ``x-ignore-shared`` (its RAM comes from the file)."""
    await vm.execute("migrate-set-capabilities",
                     migrate_capabilities(vm.record.spec.memory_file is not None))
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
