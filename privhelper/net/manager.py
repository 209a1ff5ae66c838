"""The network layer's entry point for the VM engine.

Typical life of a workspace::

    net = NetworkManager(settings, state_dir)
    net.start()                                   # on helper start: bridge, rules, gc
    att = net.attach("ws1", owner_uid, policy)    # address + TAP fd + rules
    # VM engine: qemu ... -netdev tap,id=n0,fd=N -device virtio-net-device,netdev=n0,mac=att.mac
    #            (pass att.tap_fd with pass_fds, then close it in the helper);
    #            configure the guest through the agent: att.address/prefix, gateway, dns
    net.add_forward("ws1", Forward(host_port=8080, guest_port=80))
    net.set_policy("ws1", NetPolicy(egress=True))
    ...                                           # VM stops: its TAP vanishes with QEMU
    net.open_tap("ws1")                           # VM starts again: same address, new TAP
    net.detach("ws1")                             # workspace destroyed: all of it goes

Every mutation is validated by building the whole ruleset first (a typed error
leaves nothing changed), then the new state is saved (the file is the truth)
and the ruleset is applied in one transaction; if the kernel refuses it, the
old state is restored.  Methods are blocking (netlink, a short nft run): call
them from a worker thread (``anyio.to_thread.run_sync``) in async code.  A lock
serialises them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from .config import NetSettings
from .errors import NetConflict, PortUnavailable, WorkspaceNotFound
from .links import Links, set_sysctl
from .model import (
    Forward,
    NetPolicy,
    NetState,
    WorkspaceNet,
    check_forward,
    check_name,
    check_policy,
    check_uid,
)
from .naming import mac_for, tap_name
from .nft import Nft
from .pool import allocate
from .ports import nft_ruleset_json, port_unavailable
from .ruleset import build_ruleset, delete_ruleset
from .store import STATE_FILE_NAME, load_state, save_state
from .tap import open_tap


class RulesetApplier(Protocol):
    """What the manager needs from :class:`~.nft.Nft`."""

    def apply(self, doc: dict[str, Any]) -> None: ...


class LinkOps(Protocol):
    """What the manager needs from :class:`~.links.Links`."""

    def ensure_bridge(self, s: NetSettings) -> int: ...
    def enslave(self, name: str, bridge: str) -> None: ...
    def names(self) -> list[str]: ...
    def delete(self, name: str) -> bool: ...
    def host_networks(self, exclude: str) -> list[str]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Attachment:
    """What the VM engine needs to plug a workspace in.

    ``tap_fd`` belongs to the caller: hand it to QEMU, then close it.
    """

    workspace: str
    tap_fd: int
    tap_name: str
    mac: str
    address: str
    gateway: str
    prefix: int
    dns: tuple[str, ...]


@dataclass
class GcReport:
    removed_links: list[str] = field(default_factory=list)
    released_workspaces: list[str] = field(default_factory=list)


class NetworkManager:
    def __init__(
        self,
        settings: NetSettings,
        state_dir: Path,
        *,
        nft: RulesetApplier | None = None,
        links: LinkOps | None = None,
        tap_opener: Callable[[str, bool], int] = open_tap,
        port_probe: Callable[[int, str], str | None] | None = None,
        host_networks: Callable[[], list[str]] | None = None,
        sysctl: Callable[[str, str], None] = set_sysctl,
        vnet_hdr: bool = True,
    ) -> None:
        self.settings = settings
        self.state_path = Path(state_dir) / STATE_FILE_NAME
        self.nft: RulesetApplier = nft or Nft()
        self.links: LinkOps = links or Links()
        self._open_tap = tap_opener
        #: Why a host port cannot be forwarded (None: it can); see ports.py.
        self._port_unavailable = port_probe or _live_port_probe
        #: The host's own IPv4 networks (CIDRs), blocked for guests unless the
        #: config says otherwise; read again at every ruleset build.
        self._host_networks = host_networks or (
            lambda: self.links.host_networks(self.settings.bridge)
        )
        self._sysctl = sysctl
        self._vnet_hdr = vnet_hdr
        #: Protects ``_state`` and the host state it mirrors (TAPs, nft rules,
        #: the state file): one change at a time, a name or port checked free
        #: and taken under it.  Re-entrant: public methods call each other.
        self._lock = threading.RLock()
        self._state = load_state(self.state_path)

    # --- queries -----------------------------------------------------------------------

    @property
    def state(self) -> NetState:
        return self._state

    def get(self, workspace: str) -> WorkspaceNet:
        ws = self._state.workspaces.get(check_name(workspace))
        if ws is None:
            raise WorkspaceNotFound(f"no network for workspace {workspace}")
        return ws

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, known_workspaces: Iterable[str] | None = None) -> GcReport:
        """On helper start: bridge up, ruleset re-applied from the saved state, gc.

        Running VMs keep their TAPs across a helper restart (QEMU holds the fds),
        so re-applying the rules is all the adoption there is.
        """
        with self._lock:
            self._state = load_state(self.state_path)
            self.links.ensure_bridge(self.settings)
            self.reapply()
            return self.gc(known_workspaces)

    def reapply(self) -> None:
        """Make the kernel's tables match the saved state (one transaction)."""
        with self._lock:
            self._apply(self._state)

    def teardown(self) -> None:
        """Remove our tables and the bridge (uninstall, tests).  Keeps the state file."""
        with self._lock:
            self.nft.apply(delete_ruleset())
            self.links.delete(self.settings.bridge)

    def gc(self, known_workspaces: Iterable[str] | None = None) -> GcReport:
        """Remove leftovers: links with our TAP prefix that no workspace owns and,
        when the caller says which workspaces exist, the network of the others."""
        report = GcReport()
        with self._lock:
            if known_workspaces is not None:
                known = set(known_workspaces)
                gone = sorted(set(self._state.workspaces) - known)
                if gone:
                    self._commit(self._without(gone))
                    report.released_workspaces = gone
            owned = {ws.tap for ws in self._state.workspaces.values()}
            for name in self.links.names():
                ours = name.startswith(self.settings.tap_prefix)
                if ours and name not in owned and self.links.delete(name):
                    report.removed_links.append(name)
        return report

    # --- workspaces ----------------------------------------------------------------------

    def reserve(
        self,
        workspace: str,
        owner_uid: int,
        policy: NetPolicy | None = None,
        address: str | None = None,
    ) -> WorkspaceNet:
        """Give ``workspace`` an address (if it has none yet) and its rules.

        Idempotent for the same owner; a new ``policy`` replaces the old one.
        """
        check_name(workspace)
        check_uid(owner_uid)
        with self._lock:
            ws = self._state.workspaces.get(workspace)
            if ws is not None:
                if ws.owner_uid != owner_uid:
                    raise NetConflict(f"workspace {workspace} belongs to another owner")
                if policy is not None and policy != ws.policy:
                    return self.set_policy(workspace, policy)
                return ws
            pol = check_policy(policy or NetPolicy())
            used = [w.address for w in self._state.workspaces.values()]
            addr, cursor = allocate(self.settings, used, self._state.cursor, prefer=address)
            ws = WorkspaceNet(
                name=workspace,
                owner_uid=owner_uid,
                address=str(addr),
                mac=mac_for(addr),
                tap=tap_name(self.settings.tap_prefix, addr),
                policy=pol,
            )
            workspaces = {**self._state.workspaces, workspace: ws}
            self._commit(msgspec.structs.replace(self._state, cursor=cursor, workspaces=workspaces))
            return ws

    def open_tap(self, workspace: str) -> Attachment:
        """Create the workspace's TAP on the bridge and return its fd."""
        with self._lock:
            ws = self.get(workspace)
            self.links.ensure_bridge(self.settings)
            fd = self._open_tap(ws.tap, self._vnet_hdr)
            try:
                self.links.enslave(ws.tap, self.settings.bridge)
            except BaseException:
                os.close(fd)  # the TAP disappears with its only fd
                raise
            return self._attachment(ws, fd)

    def attach(
        self,
        workspace: str,
        owner_uid: int,
        policy: NetPolicy | None = None,
        address: str | None = None,
    ) -> Attachment:
        """:meth:`reserve` then :meth:`open_tap`; a failure undoes a new reservation."""
        with self._lock:
            new = workspace not in self._state.workspaces
            self.reserve(workspace, owner_uid, policy, address)
            try:
                return self.open_tap(workspace)
            except BaseException:
                if new:
                    with contextlib.suppress(Exception):
                        self.detach(workspace)
                raise

    def hand_over(self, workspace: str, owner_uid: int, policy: NetPolicy) -> Attachment:
        """Give ``workspace``'s network (TAP, address, MAC, forwards none) to
        ``owner_uid`` under ``policy``: a warm pool VM taken over.  Its rules
        change in one commit; the returned attachment has no TAP fd (-1)."""
        check_uid(owner_uid)
        with self._lock:
            ws = msgspec.structs.replace(
                self.get(workspace), owner_uid=owner_uid, policy=check_policy(policy),
                forwards=(),
            )
            self._commit(self._with(ws))
            return self._attachment(ws, -1)

    def detach(self, workspace: str) -> None:
        """Destroy the workspace's network: rules, forwards, address, TAP."""
        with self._lock:
            ws = self.get(workspace)
            self._commit(self._without([workspace]))
            self.links.delete(ws.tap)

    def set_policy(self, workspace: str, policy: NetPolicy) -> WorkspaceNet:
        with self._lock:
            ws = msgspec.structs.replace(self.get(workspace), policy=check_policy(policy))
            self._commit(self._with(ws))
            return ws

    def add_forward(self, workspace: str, forward: Forward) -> WorkspaceNet:
        """Forward a host port to the guest; refused for privileged or busy ports."""
        with self._lock:
            ws = self.get(workspace)
            fwd = check_forward(forward, self.settings.forward_port_min)
            for other in self._state.workspaces.values():
                for f in other.forwards:
                    if (f.protocol, f.host_port) == (fwd.protocol, fwd.host_port):
                        raise PortUnavailable(
                            f"host port {fwd.protocol}/{fwd.host_port} is already forwarded "
                            "to a workspace; choose another host port"
                        )
            why = self._port_unavailable(fwd.host_port, fwd.protocol)
            if why is not None:
                raise PortUnavailable(
                    f"host port {fwd.protocol}/{fwd.host_port} is in use: {why}; "
                    "choose another host port, or stop what holds it"
                )
            ws = msgspec.structs.replace(ws, forwards=(*ws.forwards, fwd))
            self._commit(self._with(ws))
            return ws

    def remove_forward(self, workspace: str, host_port: int, protocol: str = "tcp") -> None:
        with self._lock:
            ws = self.get(workspace)
            kept = tuple(
                f for f in ws.forwards if (f.host_port, f.protocol) != (host_port, protocol)
            )
            if len(kept) == len(ws.forwards):
                raise WorkspaceNotFound(
                    f"workspace {workspace} has no forward {protocol}/{host_port}"
                )
            self._commit(self._with(msgspec.structs.replace(ws, forwards=kept)))

    # --- internals ----------------------------------------------------------------------

    def _attachment(self, ws: WorkspaceNet, fd: int) -> Attachment:
        s = self.settings
        return Attachment(
            workspace=ws.name,
            tap_fd=fd,
            tap_name=ws.tap,
            mac=ws.mac,
            address=ws.address,
            gateway=str(s.gateway),
            prefix=s.prefixlen,
            dns=(str(s.gateway),) if s.gateway_dns else tuple(str(a) for a in s.dns),
        )

    def _with(self, ws: WorkspaceNet) -> NetState:
        return msgspec.structs.replace(
            self._state, workspaces={**self._state.workspaces, ws.name: ws}
        )

    def _without(self, names: Iterable[str]) -> NetState:
        drop = set(names)
        kept = {k: v for k, v in self._state.workspaces.items() if k not in drop}
        return msgspec.structs.replace(self._state, workspaces=kept)

    def _commit(self, new: NetState) -> None:
        """Validate (by building the ruleset), save, apply; restore on failure."""
        doc = build_ruleset(self.settings, new, self._host_networks())
        old = self._state
        save_state(self.state_path, new)
        self._state = new
        try:
            self._apply(new, doc)
        except BaseException:
            save_state(self.state_path, old)
            self._state = old
            raise

    def _apply(self, state: NetState, doc: dict[str, Any] | None = None) -> None:
        if doc is None:
            doc = build_ruleset(self.settings, state, self._host_networks())
        if any(ws.policy.egress or ws.forwards for ws in state.workspaces.values()):
            # Routing between the bridge and other interfaces.  Never switched
            # back off: other software on the host may rely on it too.
            self._sysctl("ipv4/ip_forward", "1")
        self.nft.apply(doc)


def _live_port_probe(port: int, protocol: str) -> str | None:
    return port_unavailable(port, protocol, nft_ruleset_json(Nft().list_ruleset_json))

