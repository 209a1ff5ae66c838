"""Address pool and the names/MACs derived from addresses."""

from __future__ import annotations

import ipaddress

import pytest

from agentiso.privhelper.net.config import NetConfig, default_settings, parse_net_config
from agentiso.privhelper.net.errors import InvalidNetInput, PoolExhausted
from agentiso.privhelper.net.model import IFNAME_PATTERN
from agentiso.privhelper.net.naming import bridge_mac, mac_for, tap_name
from agentiso.privhelper.net.pool import allocate, capacity
from agentiso.protocol.errors import ErrorCode


def test_first_address_skips_network_and_gateway() -> None:
    s = default_settings()
    addr, cursor = allocate(s, [], 0)
    assert str(addr) == "10.42.0.2"
    assert cursor == 2


def test_never_returns_an_allocated_address_and_walks_round_robin() -> None:
    s = default_settings()
    used: list[str] = []
    cursor = 0
    for _ in range(50):
        addr, cursor = allocate(s, used, cursor)
        assert str(addr) not in used
        used.append(str(addr))
    # Free an early one: it is not handed out next (round robin continues).
    used.remove("10.42.0.3")
    addr, cursor = allocate(s, used, cursor)
    assert str(addr) == "10.42.0.52"


def test_small_subnet_exhausts_and_wraps() -> None:
    s = parse_net_config(NetConfig(subnet="192.168.7.0/29", gateway="192.168.7.1"))
    assert capacity(s) == 5
    used: list[str] = []
    cursor = 0
    for _ in range(5):
        addr, cursor = allocate(s, used, cursor)
        assert addr not in (s.gateway, s.subnet.network_address, s.subnet.broadcast_address)
        used.append(str(addr))
    assert sorted(used) == [f"192.168.7.{i}" for i in range(2, 7)]
    with pytest.raises(PoolExhausted) as exc:
        allocate(s, used, cursor)
    assert exc.value.code is ErrorCode.LIMIT_EXCEEDED
    used.remove("192.168.7.4")
    addr, _ = allocate(s, used, cursor)  # wraps around to the only free one
    assert str(addr) == "192.168.7.4"


def test_gateway_in_the_middle_is_skipped() -> None:
    s = parse_net_config(NetConfig(subnet="192.168.7.0/29", gateway="192.168.7.3"))
    got: list[str] = []
    cursor = 0
    for _ in range(5):
        addr, cursor = allocate(s, got, cursor)
        got.append(str(addr))
    assert "192.168.7.3" not in got


def test_mac_is_deterministic_local_unicast() -> None:
    addr = ipaddress.IPv4Address("10.42.1.2")
    mac = mac_for(addr)
    assert mac == "02:a6:0a:2a:01:02" == mac_for(ipaddress.IPv4Address("10.42.1.2"))
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert mac_for(ipaddress.IPv4Address("10.42.1.3")) != mac
    assert bridge_mac(ipaddress.IPv4Address("10.42.0.1")) == "02:a6:0a:2a:00:01"


def test_tap_names_fit_ifnamsiz_and_are_unique() -> None:
    names = {
        tap_name("ai-", ipaddress.IPv4Address(f"10.42.{i // 256}.{i % 256}"))
        for i in range(2, 1000)
    }
    assert len(names) == 998
    for n in names:
        assert len(n) <= 15 and IFNAME_PATTERN.fullmatch(n)
    assert tap_name("ai-", ipaddress.IPv4Address("10.42.0.2")) == "ai-0a2a0002"
    assert len(tap_name("agentis", ipaddress.IPv4Address("255.255.255.254"))) == 15


def test_tap_name_rejects_bad_prefix() -> None:
    with pytest.raises(InvalidNetInput):
        tap_name("a*", ipaddress.IPv4Address("10.42.0.2"))
    with pytest.raises(InvalidNetInput):
        tap_name("toolong-", ipaddress.IPv4Address("10.42.0.2"))
