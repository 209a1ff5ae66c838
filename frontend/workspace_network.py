"""The network half of the orchestrator: policies, peers and port forwards.

A mixin of :class:`~.workspaces.Workspaces` (it uses the catalog, the kept
helper connection and the ownership check of that class).  What a workspace
may reach is kept in its catalog row (``allow_internet`` and ``network``:
allow-list, peers, groups, forwards), so it survives a stop and a start.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import Conflict, InvalidRequest, NotFound

from . import lifecycle
from .catalog import Catalog, WorkspaceRecord
from .helper_client import HelperClient
from .lifecycle import Operation, State
from .workspace_errors import WorkspaceError

log = structlog.get_logger("agentiso.frontend.network")

Protocol = Literal["tcp", "udp"]
#: Host ports a forward gets when the caller names none.
FORWARD_PORTS = (20000, 45000)


class NetworkError(WorkspaceError):
    pass


class NetworkOps:
    """Network operations on workspaces (mixed into the orchestrator)."""

    catalog: Catalog

    def owned(self, ref: str) -> WorkspaceRecord:
        raise NotImplementedError

    def helper_call(self) -> AbstractAsyncContextManager[HelperClient]:
        raise NotImplementedError

    def _policy(self, rec: WorkspaceRecord) -> hp.NetworkPolicy:
        """The helper policy of a workspace: internet, allow-list, groups, and
        the peers that have a VM now (a stopped peer has no address to allow)."""
        net = rec.network
        peers = []
        for name in net.get("peers", []):
            peer = self.catalog.find_workspace(name)
            if peer is not None and peer.state is State.RUNNING:
                peers.append(peer.vm)
        return hp.NetworkPolicy(
            egress=rec.allow_internet,
            allow=[hp.AllowRule(cidr=a["cidr"], protocol=a.get("protocol", "any"),
                                ports=[hp.PortRange(first=p[0], last=p[1])
                                       for p in a.get("ports", [])])
                   for a in net.get("allow", [])],
            peers=peers,
            groups=list(net.get("groups", [])),
        )

    async def set_network(
        self, ref: str, *, allow_internet: bool | None, allow: list[dict[str, Any]] | None,
        peers: list[str] | None, groups: list[str] | None,
    ) -> tuple[WorkspaceRecord, hp.VmInfo | None]:
        """Change what a workspace may reach; applied at once (atomically) if it runs."""
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.NETWORK)
        net = dict(rec.network)
        if allow is not None:
            net["allow"] = allow
        if peers is not None:
            for p in peers:
                if self.catalog.get_workspace(p).id == rec.id:
                    raise NetworkError(f"workspace {rec.name!r} cannot peer with itself",
                                       "Name other workspaces of yours in peers.")
            net["peers"] = [self.catalog.get_workspace(p).name for p in peers]
        if groups is not None:
            net["groups"] = groups
        changes: dict[str, Any] = {"network": net}
        if allow_internet is not None:
            changes["allow_internet"] = allow_internet
        new = self.catalog.update_workspace(rec.id, **changes)
        vm = None
        if new.state is State.RUNNING:
            try:
                async with self.helper_call() as h:
                    vm = await h.vm_network_set(name=new.vm, policy=self._policy(new))
            except BaseException:
                # Not applied: the catalog goes back to what the VM still has.
                self.catalog.update_workspace(rec.id, network=rec.network,
                                              allow_internet=rec.allow_internet)
                raise
            await self._refresh_peers_of(new)
        return new, vm

    async def _refresh_peers_of(self, rec: WorkspaceRecord) -> None:
        """Re-apply the policies of running workspaces that name ``rec`` as a peer
        (their policy could not include it while it had no VM)."""
        for other in self.catalog.list_workspaces():
            if other.id != rec.id and other.state is State.RUNNING and \
                    rec.name in other.network.get("peers", []):
                try:
                    async with self.helper_call() as h:
                        await h.vm_network_set(name=other.vm, policy=self._policy(other))
                except Exception as exc:
                    log.warning("peer_refresh_failed", workspace=other.name, error=str(exc))

    async def forward_add(self, ref: str, *, guest_port: int, host_port: int | None,
                          protocol: Protocol, external: bool = False,
                          ) -> tuple[WorkspaceRecord, int]:
        """Forward a host port (chosen if None) to ``guest_port``; kept across
        restarts.  Only the user (and root) reach it from the host itself;
        ``external`` opens it to other hosts too."""
        rec = self.owned(ref)
        lifecycle.require(rec.name, rec.state, Operation.EXEC)  # a forward needs the VM
        tries = [host_port] if host_port else [
            FORWARD_PORTS[0] + secrets.randbelow(FORWARD_PORTS[1] - FORWARD_PORTS[0])
            for _ in range(20)]
        last: Exception | None = None
        for port in tries:
            try:
                async with self.helper_call() as h:
                    await h.forward_add(vm=rec.vm, host_port=port, guest_port=guest_port,
                                        protocol=protocol, external=external)
            except Conflict as exc:
                last = exc
                if host_port:
                    raise
                continue
            fwd = {"host_port": port, "guest_port": guest_port, "protocol": protocol,
                   "external": external}
            net = dict(rec.network)
            net["forwards"] = [*net.get("forwards", []), fwd]
            return self.catalog.update_workspace(rec.id, network=net), port
        raise NetworkError(f"no free host port found for the forward ({last})",
                           "Give host_port explicitly.")

    async def forward_remove(self, ref: str, *, host_port: int,
                             protocol: Protocol) -> WorkspaceRecord:
        rec = self.owned(ref)
        net = dict(rec.network)
        kept = [f for f in net.get("forwards", [])
                if (f["host_port"], f["protocol"]) != (host_port, protocol)]
        if len(kept) == len(net.get("forwards", [])):
            raise NetworkError(f"workspace {rec.name!r} has no {protocol} forward from host "
                               f"port {host_port}", "See its forwards with workspace_info.")
        if rec.state is State.RUNNING:
            try:
                async with self.helper_call() as h:
                    await h.forward_remove(vm=rec.vm, host_port=host_port, protocol=protocol)
            except NotFound:
                pass
        net["forwards"] = kept
        return self.catalog.update_workspace(rec.id, network=net)

    async def _restore_forwards(self, h: HelperClient, rec: WorkspaceRecord,
                                vm: hp.VmInfo) -> hp.VmInfo:
        """After a start: put the workspace's forwards back (a port taken
        meanwhile is dropped, and the reason kept)."""
        lost = []
        for f in rec.network.get("forwards", []):
            try:
                vm = await h.forward_add(vm=rec.vm, host_port=f["host_port"],
                                         guest_port=f["guest_port"], protocol=f["protocol"],
                                         external=f.get("external", False))
            except (Conflict, InvalidRequest) as exc:
                lost.append(f)
                log.warning("forward_lost", workspace=rec.name, port=f["host_port"],
                            error=str(exc))
        if lost:
            net = dict(rec.network)
            net["forwards"] = [f for f in net.get("forwards", []) if f not in lost]
            self.catalog.update_workspace(rec.id, network=net,
                                          state_reason=f"forwards dropped at start (port "
                                          f"taken): {[f['host_port'] for f in lost]}")
        await self._refresh_peers_of(rec)
        return vm

