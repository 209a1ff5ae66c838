"""Network requests of VMs (policy, port forwards) and the VM's network attachment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from ..errors import RequestFailed
from ..net.manager import Attachment as NetAttachmentInfo
from ..net.manager import NetworkManager
from ..net.model import Forward
from ..registry import Registry, VmRecord
from ..server import RequestContext
from .policy import to_net_policy
from .views import VmViews


@dataclass
class VmNetwork:
    """Handles VmNetworkSet, ForwardAdd, ForwardRemove; attaches and detaches VMs.

    No lock of its own: the :class:`~..net.manager.NetworkManager` serialises
    its state changes (it runs them in worker threads under its own lock).
    """

    HANDLES: ClassVar[dict[type[Any], str]] = {
        hp.VmNetworkSet: "vm_network_set",
        hp.ForwardAdd: "forward_add",
        hp.ForwardRemove: "forward_remove",
    }

    registry: Registry
    views: VmViews
    #: None: the helper gives VMs no network (it could not set the bridge up).
    net: NetworkManager | None = None

    def need(self) -> NetworkManager:
        if self.net is None:
            raise RequestFailed(
                ErrorCode.UNAVAILABLE, "networking is not available on this helper (see its log)"
            )
        return self.net

    async def attach(
        self, owner: int, key: str, wire: hp.NetworkPolicy, address: str | None = None
    ) -> NetAttachmentInfo:
        """A TAP (its fd is the caller's to close), an address and the rules for VM ``key``."""
        net = self.need()
        policy = to_net_policy(self.registry, owner, wire)
        return await anyio.to_thread.run_sync(net.attach, key, owner, policy, address)

    async def hand_over(self, owner: int, key: str, wire: hp.NetworkPolicy) -> NetAttachmentInfo:
        """VM ``key``'s network becomes ``owner``'s, under policy ``wire``
        (a warm pool VM taken over: :mod:`.pool`)."""
        net = self.need()
        policy = to_net_policy(self.registry, owner, wire)
        return await anyio.to_thread.run_sync(net.hand_over, key, owner, policy)

    async def detach(self, key: str) -> None:
        """Remove VM ``key``'s TAP, address and rules, if it has any."""
        if self.net is not None and key in self.net.state.workspaces:
            await anyio.to_thread.run_sync(self.net.detach, key)

    def address_of(self, key: str) -> str | None:
        if self.net is None:
            return None
        ws = self.net.state.workspaces.get(key)
        return ws.address if ws is not None else None

    def _attached(self, rec: VmRecord, name: str) -> NetworkManager:
        net = self.need()
        if rec.key not in net.state.workspaces:
            raise RequestFailed(ErrorCode.CONFLICT, f"VM {name!r} has no network interface")
        return net

    async def vm_network_set(self, req: hp.VmNetworkSet, ctx: RequestContext) -> hp.VmInfo:
        rec = self.registry.vm(ctx.owner, req.name)
        net = self._attached(rec, req.name)
        policy = to_net_policy(self.registry, ctx.owner, req.policy)
        await anyio.to_thread.run_sync(net.set_policy, rec.key, policy)
        return self.views.info(req.id, rec)

    async def forward_add(self, req: hp.ForwardAdd, ctx: RequestContext) -> hp.VmInfo:
        rec = self.registry.vm(ctx.owner, req.vm)
        net = self._attached(rec, req.vm)
        fwd = Forward(
            host_port=req.host_port,
            guest_port=req.guest_port,
            protocol=req.protocol,
            external=req.external,
        )
        await anyio.to_thread.run_sync(net.add_forward, rec.key, fwd)
        return self.views.info(req.id, rec)

    async def forward_remove(self, req: hp.ForwardRemove, ctx: RequestContext) -> hp.VmInfo:
        rec = self.registry.vm(ctx.owner, req.vm)
        net = self.need()
        await anyio.to_thread.run_sync(net.remove_forward, rec.key, req.host_port, req.protocol)
        return self.views.info(req.id, rec)
