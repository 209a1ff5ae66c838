"""What a client sees of a VM: :class:`~agentiso.protocol.helper.VmInfo` from
the registry, the engine's status and the network state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentiso.protocol import helper as hp

from ..errors import HelperError
from ..net.manager import NetworkManager
from ..registry import EndedVmRecord, Registry, VmRecord
from ..vm.engine import VmEngine, VmState, VmStatus
from .policy import to_wire_policy

#: Engine state -> wire state (a paused VM is running as far as a client knows:
#: the helper pauses only around a memory snapshot).
WIRE_STATE = {
    VmState.STARTING: "starting",
    VmState.RUNNING: "running",
    VmState.PAUSED: "running",
    VmState.STOPPING: "stopping",
    VmState.STOPPED: "stopped",
    VmState.CRASHED: "crashed",
}


@dataclass
class VmViews:
    registry: Registry
    engine: VmEngine
    net: NetworkManager | None = None
    #: When VM ``rec``'s first time limit fires if nothing happens (epoch
    #: seconds; None: no limit); set by the time-limit timer.
    expires_at: Callable[[VmRecord], float | None] | None = None

    def console(self, key: str, nbytes: int = 64 * 1024) -> str:
        """The tail of VM ``key``'s serial console ('' if the engine has none)."""
        try:
            return self.engine.console_tail(key, nbytes).decode(errors="replace")
        except HelperError:
            return ""

    def info(self, rid: int, rec: VmRecord) -> hp.VmInfo:
        vol = self.registry.volume_by_key(rec.volume_key)
        try:
            st: VmStatus | None = self.engine.status(rec.key)
        except HelperError:
            st = None
        state = "crashed" if st is None else WIRE_STATE.get(st.state, "crashed")
        reason = ""
        if st is not None and st.state == VmState.CRASHED:
            reason = f"{st.exit_reason}; console: {(st.console_tail or '')[-2000:]}"
        elif st is None:
            reason = "QEMU is gone (it ended while the helper was not running)"
        elif st.io_error is not None:
            reason = f"paused by QEMU: {st.io_error}"
        return hp.VmInfo(
            id=rid,
            name=rec.name,
            volume=vol.name,
            state=state,  # type: ignore[arg-type]
            vcpus=rec.vcpus,
            memory_mib=rec.memory_mib,
            created=rec.created,
            accel=self.engine.record(rec.key).spec.accel.kind if st is not None else "",
            reason=reason[:4096],
            network=self._net_info(rec),
            time_limits=rec.time_limits,
            expires_at=None if self.expires_at is None else self.expires_at(rec),
        )

    @staticmethod
    def ended_info(rid: int, e: EndedVmRecord) -> hp.VmInfo:
        """A VM a time limit ended: stopped, holding nothing, with the reason."""
        return hp.VmInfo(
            id=rid,
            name=e.name,
            volume=e.volume,
            state="stopped",
            vcpus=e.vcpus,
            memory_mib=e.memory_mib,
            created=e.created,
            reason=e.reason[:4096],
            time_limits=e.time_limits,
            ended=hp.VmEnded(limit=e.limit, at=e.at, action=e.action),
        )

    def _net_info(self, rec: VmRecord) -> hp.VmNetworkInfo | None:
        if self.net is None:
            return None
        ws = self.net.state.workspaces.get(rec.key)
        if ws is None:
            return None
        s = self.net.settings
        return hp.VmNetworkInfo(
            address=ws.address, prefix=s.prefixlen, gateway=str(s.gateway), mac=ws.mac,
            policy=to_wire_policy(self.registry, rec.owner, ws.policy),
            forwards=[
                hp.ForwardInfo(host_port=f.host_port, guest_port=f.guest_port, protocol=f.protocol)
                for f in ws.forwards
            ],
        )
