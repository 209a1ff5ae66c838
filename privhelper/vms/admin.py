"""Root's requests: every user's VMs and volumes (AdminList), and the gc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import structlog

from agentiso.protocol import helper as hp

from ..net.manager import NetworkManager
from ..paging import page
from ..server import RequestContext
from ..service import WorkspaceService
from ..vm.engine import VmEngine, VmState
from .channels import engine_state
from .snapshots import MEMORY_FILE_SUFFIX
from .views import VmViews

log = structlog.get_logger("agentiso.helper.admin")


@dataclass
class Admin:
    """Handles AdminList and Gc (the server lets only root send them).

    The gc decides what is orphaned and removes it under ``ws.lock``, so no
    VM or volume can be registered between the two.
    """

    HANDLES: ClassVar[dict[type[Any], str]] = {hp.AdminList: "admin_list", hp.Gc: "gc"}

    ws: WorkspaceService
    engine: VmEngine
    views: VmViews
    net: NetworkManager | None = None

    async def admin_list(self, req: hp.AdminList, ctx: RequestContext) -> hp.AdminListing:
        reg = self.ws.registry
        vols = [
            hp.AdminVolume(
                owner=v.owner, name=v.name, key=v.key, size_bytes=v.size_bytes,
                snapshots=[s.name for s in v.snapshots],
                vm=(m.name if (m := reg.vm_on_volume(v.key)) is not None else None),
            )
            for v in reg.volumes()
        ]
        vms = []
        for m in reg.vms():
            info = self.views.info(0, m)
            pid = qemu_uid = 0
            if engine_state(self.engine, m.key) is not None:
                st = self.engine.status(m.key)
                pid, qemu_uid = st.pid, st.uid
            vms.append(hp.AdminVm(
                owner=m.owner, name=m.name, key=m.key, volume=info.volume, state=info.state,
                vcpus=m.vcpus, memory_mib=m.memory_mib, pid=pid, qemu_uid=qemu_uid,
            ))
        # One sequence, volumes first, paged as a whole.
        entries: list[hp.AdminVolume | hp.AdminVm] = [*vols, *vms]
        part, next_cursor = page(entries, req.cursor)
        return hp.AdminListing(
            id=req.id,
            volumes=[e for e in part if isinstance(e, hp.AdminVolume)],
            vms=[e for e in part if isinstance(e, hp.AdminVm)],
            next_cursor=next_cursor,
        )

    async def gc(self, req: hp.Gc, ctx: RequestContext) -> hp.GcReport:
        """Find what no registry entry owns: QEMU processes, engine records,
        volumes, memory files; remove them unless ``dry_run``."""
        found: list[str] = []
        ws = self.ws
        async with ws.lock:
            vm_keys = {m.key for m in ws.registry.vms()}
            vol_keys = {v.key for v in ws.registry.volumes()}
            for orphan in self.engine.find_orphans():
                found.append(f"QEMU pid {orphan.pid} ({orphan.name}, uid {orphan.uid})")
                if not req.dry_run and self.engine.kill_orphan(orphan):
                    await _wait_gone(orphan.pid)  # it must let go of its volume
            for key in self.engine.names():
                if key in vm_keys:
                    continue
                found.append(f"VM {key} known to the engine but to no user")
                if not req.dry_run:
                    if engine_state(self.engine, key) not in (VmState.STOPPED, VmState.CRASHED):
                        await self.engine.kill(key)
                    self.engine.forget(key)
            for vol in await ws.storage.list_volumes():
                if vol.name in vol_keys:
                    continue
                found.append(f"volume {vol.name} ({vol.used_bytes} bytes used) of no user")
                if not req.dry_run:
                    await ws.storage.destroy_volume(vol.name)
            wanted = {
                s.memory_file for v in ws.registry.volumes() for s in v.snapshots if s.memory_file
            }
            for f in sorted(ws.memory_dir.glob(f"*{MEMORY_FILE_SUFFIX}")):
                if f.name not in wanted:
                    found.append(f"memory file {f.name} of no snapshot")
                    if not req.dry_run:
                        f.unlink(missing_ok=True)
            if self.net is not None:
                net = self.net
                stale = [k for k in net.state.workspaces if k not in vm_keys]
                for k in stale:
                    found.append(f"network of {k} (address {net.state.workspaces[k].address})")
                if not req.dry_run:
                    report = await anyio.to_thread.run_sync(net.gc, vm_keys)
                    found += [f"network link {name}" for name in report.removed_links]
        log.info("gc", dry_run=req.dry_run, found=len(found))
        return hp.GcReport(id=req.id, dry_run=req.dry_run, orphans=[s[:4096] for s in found])


async def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` has exited (not our child: a pidfd tells)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.move_on_after(timeout):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)
