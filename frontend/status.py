"""``agentiso status`` and ``agentiso list``: my workspaces, as my catalog and
the helper see them.

The catalog (names, sessions, lineage) and the helper (VMs, volumes, addresses)
each hold half of a workspace; :func:`workspace_rows` joins them (pure) so a
row shows both the catalog's state and what the helper really runs, and
helper resources no catalog row names are listed apart (a frontend that died
mid-create leaves those; the next ``agentiso serve`` reconciles them).
:func:`gather` is the adapter: it reads the catalog (never creating one) and
asks the helper for my VMs and volumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from agentiso.protocol import helper as hp

from .catalog import CATALOG_FILE, Catalog, WorkspaceRecord
from .config import FrontendConfig
from .helper_client import connect_helper


@dataclass(frozen=True)
class WorkspaceRow:
    name: str
    id: str
    #: The catalog's state.
    state: str
    #: The helper's VM state, or "-" when the helper runs no VM for it.
    vm: str
    vcpus: int
    memory_mb: int
    #: Bytes the disk uses now / may grow to (None: the helper has no volume).
    disk_used: int | None
    disk_size: int | None
    address: str
    snapshots: int
    #: "yours" when a session of yours holds it, "" when it waits to be adopted.
    session: str


@dataclass(frozen=True)
class Snapshot:
    """What the two sides hold, for :func:`workspace_rows`."""

    records: list[WorkspaceRecord]
    vms: list[hp.VmInfo]
    volumes: list[hp.VolumeInfo]


def workspace_rows(s: Snapshot) -> tuple[list[WorkspaceRow], list[str]]:
    """Join catalog rows with the helper's VMs and volumes (by the helper
    names a row records).  Returns the rows (by name) and a description of
    each helper resource no row names."""
    vms = {v.name: v for v in s.vms}
    vols = {v.name: v for v in s.volumes}
    rows = []
    named: set[tuple[str, str]] = set()
    for r in sorted(s.records, key=lambda r: r.name):
        vm, vol = vms.get(r.vm), vols.get(r.volume)
        named |= {("vm", r.vm), ("volume", r.volume)}
        rows.append(WorkspaceRow(
            name=r.name, id=r.id, state=str(r.state), vm=vm.state if vm else "-",
            vcpus=r.vcpus, memory_mb=r.memory_mb,
            disk_used=vol.used_bytes if vol else None, disk_size=vol.size_bytes if vol else None,
            address=vm.network.address if vm and vm.network else "-",
            snapshots=len(vol.snapshots) if vol else 0,
            session="yours" if r.session else "",
        ))
    untracked = [f"VM {v.name} ({v.state})" for v in s.vms if ("vm", v.name) not in named]
    untracked += [f"volume {v.name} ({human_bytes(v.used_bytes)} used)"
                  for v in s.volumes if ("volume", v.name) not in named]
    return rows, untracked


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render_list(rows: list[WorkspaceRow], untracked: list[str]) -> str:
    """The workspace table (and untracked helper resources under it)."""
    if not rows:
        out = ["no workspaces"]
    else:
        out = [f"{'NAME':<24} {'ID':<14} {'STATE':<10} {'VM':<9} {'CPU':>3} {'MEM':>7} "
               f"{'DISK USED':>10} {'ADDRESS':<15} {'SNAPS':>5}"]
        for r in rows:
            out.append(f"{r.name:<24} {r.id:<14} {r.state:<10} {r.vm:<9} {r.vcpus:>3} "
                       f"{r.memory_mb:>4} MB {human_bytes(r.disk_used):>10} {r.address:<15} "
                       f"{r.snapshots:>5}")
    if untracked:
        out.append("")
        out.append("held by the helper for you but in no workspace of your catalog "
                   "(the next 'agentiso serve' reconciles them):")
        out.extend(f"  {u}" for u in untracked)
    return "\n".join(out)


def render_status(hello: hp.HelloOk | None, who: hp.Identity, catalog: str,
                  rows: list[WorkspaceRow], untracked: list[str]) -> str:
    running = sum(r.vm == "running" for r in rows)
    mem = sum(r.memory_mb for r in rows if r.vm == "running")
    disk = sum(r.disk_used or 0 for r in rows)
    server = f"{hello.server} (protocol {hello.version}), up {hello.uptime_s:.0f} s" \
        if hello else "agentiso-helper"
    head = [
        f"helper:     reachable: {server}",
        f"you:        uid {who.uid} gid {who.gid}{' (admin)' if who.admin else ''}",
        f"catalog:    {catalog}",
        f"workspaces: {len(rows)}, {running} running ({mem} MB of memory), "
        f"{human_bytes(disk)} of disk used",
        "",
    ]
    return "\n".join(head) + render_list(rows, untracked)


def read_catalog(state_dir: Path) -> tuple[list[WorkspaceRecord], str]:
    """The catalog's rows and its path; no rows (and nothing created) when it
    does not exist yet."""
    path = state_dir / CATALOG_FILE
    if not path.exists():
        return [], f"{path} (none yet)"
    with Catalog.open(path) as cat:
        return cat.list_workspaces(), str(path)


async def gather(cfg: FrontendConfig, timeout: float = 10.0
                 ) -> tuple[hp.HelloOk | None, hp.Identity, Snapshot, str]:
    """Ask the helper (my VMs and volumes, who I am) and read my catalog."""
    started = time.monotonic()
    async with connect_helper(cfg.helper_socket, timeout=timeout,
                              client_name="agentiso status") as h:
        left = max(1.0, timeout - (time.monotonic() - started))
        who = await h.whoami(timeout=left)
        vms = await h.vm_list(timeout=left)
        vols = await h.volume_list(timeout=left)
        hello = h.hello
    records, where = read_catalog(cfg.state_dir)
    return hello, who, Snapshot(records, list(vms.vms), list(vols.volumes)), where
