"""The state file (atomic, strict) and the manager's bookkeeping.

The manager tests replace nft and netlink by recorders: they test what the
manager decides (allocation, ownership, validation before any change, rollback
when the kernel refuses), not nftables or netlink, which the integration tests
exercise for real.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agentiso.privhelper.net.config import NetSettings, default_settings
from agentiso.privhelper.net.errors import (
    InvalidNetInput,
    NetConflict,
    NetSystemError,
    PortUnavailable,
    StateCorrupt,
    WorkspaceNotFound,
)
from agentiso.privhelper.net.manager import NetworkManager
from agentiso.privhelper.net.model import Forward, NetPolicy, NetState
from agentiso.privhelper.net.store import load_state, save_state
from agentiso.protocol.errors import ErrorCode

# --- store ------------------------------------------------------------------------------


def test_missing_state_is_empty(tmp_path: Path) -> None:
    assert load_state(tmp_path / "net.json") == NetState()


def test_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "net.json"
    st = NetState(cursor=7)
    save_state(path, st)
    assert load_state(path) == st
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["net.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"version": 99}', b'{"workspaces": {"a": 1}}', b'{"extra": 1}'],
)
def test_corrupt_state_is_an_error_not_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "net.json"
    path.write_bytes(content)
    with pytest.raises(StateCorrupt):
        load_state(path)


# --- manager ----------------------------------------------------------------------------


class RecordingNft:
    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.fail = False

    def apply(self, doc: dict[str, Any]) -> None:
        if self.fail:
            raise NetSystemError("kernel says no")
        self.applied.append(doc)


class RecordingLinks:
    def __init__(self) -> None:
        self.existing: set[str] = set()
        self.deleted: list[str] = []

    def ensure_bridge(self, s: NetSettings) -> int:
        return 1

    def enslave(self, name: str, bridge: str) -> None:
        self.existing.add(name)

    def names(self) -> list[str]:
        return sorted(self.existing)

    def close(self) -> None:
        pass

    def host_networks(self, exclude: str) -> list[str]:
        return ["192.0.2.0/24"]

    def delete(self, name: str) -> bool:
        self.deleted.append(name)
        if name in self.existing:
            self.existing.remove(name)
            return True
        return False


def make(
    tmp_path: Path, free_ports: bool = True
) -> tuple[NetworkManager, RecordingNft, RecordingLinks]:
    nft, links = RecordingNft(), RecordingLinks()
    mgr = NetworkManager(
        default_settings(),
        tmp_path,
        nft=nft,
        links=links,
        tap_opener=lambda name, vnet: os.open("/dev/null", os.O_RDONLY),
        port_probe=lambda port, proto: None if free_ports else "a socket is bound to it",
        sysctl=lambda key, value: None,
    )
    return mgr, nft, links


def test_reserve_is_idempotent_and_owned(tmp_path: Path) -> None:
    mgr, nft, _ = make(tmp_path)
    a = mgr.reserve("a", 1000)
    assert mgr.reserve("a", 1000) == a
    assert len(nft.applied) == 1
    with pytest.raises(NetConflict):
        mgr.reserve("a", 1001)
    b = mgr.reserve("b", 1001)
    assert (a.address, b.address) == ("10.42.0.2", "10.42.0.3")
    # Persisted: a new manager (helper restart) sees the same allocations.
    again, _, _ = make(tmp_path)
    assert again.get("a") == a and again.get("b") == b


def test_freed_address_is_not_reused_next(tmp_path: Path) -> None:
    mgr, _, links = make(tmp_path)
    a = mgr.reserve("a", 1000)
    mgr.detach("a")
    assert a.tap in links.deleted
    with pytest.raises(WorkspaceNotFound):
        mgr.get("a")
    assert mgr.reserve("c", 1000).address == "10.42.0.3"


def test_invalid_input_changes_nothing(tmp_path: Path) -> None:
    mgr, nft, _ = make(tmp_path)
    mgr.reserve("a", 1000)
    before = (tmp_path / "net.json").read_bytes()
    with pytest.raises(InvalidNetInput):
        mgr.reserve("Bad/Name", 1000)
    with pytest.raises(InvalidNetInput):
        mgr.set_policy("a", NetPolicy(peers=("x y",)))
    with pytest.raises(InvalidNetInput):
        mgr.add_forward("a", Forward(host_port=443, guest_port=443))
    assert (tmp_path / "net.json").read_bytes() == before
    assert len(nft.applied) == 1


@pytest.mark.parametrize("uid", [-1, 2**32, True, "1000"])
def test_owner_uid_checked(tmp_path: Path, uid: Any) -> None:
    mgr, _, _ = make(tmp_path)
    with pytest.raises(InvalidNetInput):
        mgr.reserve("a", uid)
    assert mgr.state.workspaces == {}


def test_state_that_would_not_load_back_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "net.json"
    with pytest.raises(InvalidNetInput):
        save_state(path, NetState(cursor=-5))
    assert not path.exists()


def test_kernel_refusal_rolls_back(tmp_path: Path) -> None:
    mgr, nft, _ = make(tmp_path)
    mgr.reserve("a", 1000)
    nft.fail = True
    with pytest.raises(NetSystemError) as exc:
        mgr.set_policy("a", NetPolicy(egress=True))
    assert exc.value.code is ErrorCode.INTERNAL
    assert mgr.get("a").policy == NetPolicy()
    again, _, _ = make(tmp_path)
    assert again.get("a").policy == NetPolicy()


def test_forward_port_checks(tmp_path: Path) -> None:
    mgr, _, _ = make(tmp_path)
    mgr.reserve("a", 1000)
    mgr.reserve("b", 1000)
    mgr.add_forward("a", Forward(host_port=8080, guest_port=80))
    with pytest.raises(PortUnavailable) as exc:
        mgr.add_forward("b", Forward(host_port=8080, guest_port=80))
    assert exc.value.code is ErrorCode.CONFLICT
    mgr.add_forward("b", Forward(host_port=8080, guest_port=80, protocol="udp"))
    busy, _, _ = make(tmp_path, free_ports=False)
    with pytest.raises(PortUnavailable):
        busy.add_forward("a", Forward(host_port=9090, guest_port=80))
    with pytest.raises(WorkspaceNotFound):
        mgr.remove_forward("a", 9999)
    mgr.remove_forward("a", 8080)
    assert mgr.get("a").forwards == ()


def test_attach_gives_what_qemu_and_the_agent_need(tmp_path: Path) -> None:
    mgr, _, links = make(tmp_path)
    att = mgr.attach("a", 1000, NetPolicy(egress=True))
    try:
        assert (att.tap_name, att.mac, att.address) == (
            "ai-0a2a0002",
            "02:a6:0a:2a:00:02",
            "10.42.0.2",
        )
        assert (att.gateway, att.prefix, att.dns) == ("10.42.0.1", 16, ("1.1.1.1", "8.8.8.8"))
        assert att.tap_name in links.existing
        assert mgr.get("a").policy.egress
    finally:
        os.close(att.tap_fd)


def test_failed_attach_releases_a_new_reservation(tmp_path: Path) -> None:
    mgr, _, _ = make(tmp_path)

    def no_tun(name: str, vnet: bool) -> int:
        raise NetSystemError("no tun")

    mgr._open_tap = no_tun
    with pytest.raises(NetSystemError):
        mgr.attach("a", 1000)
    assert mgr.state.workspaces == {}


def test_gc(tmp_path: Path) -> None:
    mgr, _, links = make(tmp_path)
    a = mgr.reserve("a", 1000)
    mgr.reserve("b", 1000)
    links.existing |= {a.tap, "ai-deadbeef", "eth0", "br-agentiso"}
    report = mgr.gc(known_workspaces=["a"])
    assert report.removed_links == ["ai-deadbeef"]
    assert report.released_workspaces == ["b"]
    assert set(mgr.state.workspaces) == {"a"}
    assert links.existing == {a.tap, "eth0", "br-agentiso"}
