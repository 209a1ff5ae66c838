"""Validation of everything that enters the network state: hostile input -> typed errors."""

from __future__ import annotations

import msgspec
import pytest

from agentiso.privhelper.errors import HelperError
from agentiso.privhelper.net.config import NetConfig, parse_net_config
from agentiso.privhelper.net.errors import InvalidNetInput, NetConfigError, NetError
from agentiso.privhelper.net.model import (
    AllowRule,
    Forward,
    NetPolicy,
    PortRange,
    check_forward,
    check_ifname,
    check_mac,
    check_name,
    check_policy,
    check_port,
    parse_address,
    parse_network,
)
from agentiso.protocol.errors import ErrorCode

HOSTILE_NAMES = [
    "",
    "A",
    "-x",
    "a/b",
    "..",
    "../etc",
    "a b",
    "a;rm -rf /",
    "a$(id)",
    "a`id`",
    "a\0b",
    "a\n",
    "x" * 64,
    "é",
    "a*",
    "a.b",
    None,
    5,
    b"abc",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_workspace_names(name: object) -> None:
    with pytest.raises(InvalidNetInput) as exc:
        check_name(name)
    assert exc.value.code is ErrorCode.INVALID
    assert isinstance(exc.value, HelperError)


def test_good_names() -> None:
    assert check_name("ws-1") == "ws-1"
    assert check_name("a" * 63) == "a" * 63


@pytest.mark.parametrize(
    "name",
    ["", "x" * 16, "ai-*", "eth0:1", "a b", "a/b", 'a"b', "a\\b", "Eth0", "0abc", "a\0", "a\n"],
)
def test_hostile_interface_names(name: str) -> None:
    with pytest.raises(InvalidNetInput):
        check_ifname(name)


def test_interface_name_limit() -> None:
    assert check_ifname("a" * 15) == "a" * 15


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.0/-1",
        "::/0",
        "fe80::/64",
        "010.0.0.0/8",
        "10.0.0.0/8; drop",
        "10.0.0.0 /8",
        "",
        "10.0.0.0/8\n",
        "300.0.0.0/8",
        "10.0.0.0/08",
        "1.2.3.4/32/1",
        None,
        10,
    ],
)
def test_hostile_cidrs(text: object) -> None:
    with pytest.raises(InvalidNetInput):
        parse_network(text)


def test_cidrs() -> None:
    assert str(parse_network("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_network("1.2.3.4")) == "1.2.3.4/32"


@pytest.mark.parametrize(
    "text", ["", "1.2.3", "1.2.3.4.5", "01.2.3.4", "::1", "1.2.3.4/32", " 1.2.3.4", "1.2.3.256"]
)
def test_hostile_addresses(text: str) -> None:
    with pytest.raises(InvalidNetInput):
        parse_address(text)


@pytest.mark.parametrize("port", [0, -1, 65536, 10**9, True, "80", 80.0, None])
def test_ports_out_of_range(port: object) -> None:
    with pytest.raises(InvalidNetInput):
        check_port(port)


@pytest.mark.parametrize("mac", ["", "02:a6:0a:2a:00", "02-a6-0a-2a-00-02", "02:A6:0a:2a:00:02x"])
def test_bad_macs(mac: str) -> None:
    with pytest.raises(InvalidNetInput):
        check_mac(mac)


@pytest.mark.parametrize(
    "policy",
    [
        NetPolicy(allow=(AllowRule(cidr="10.0.0.1/8"),)),
        NetPolicy(allow=(AllowRule(cidr="0.0.0.0/0", ports=(PortRange(90, 80),)),)),
        NetPolicy(allow=(AllowRule(cidr="0.0.0.0/0", ports=(PortRange(0, 80),)),)),
        NetPolicy(allow=(AllowRule(cidr="0.0.0.0/0", protocol="icmp"),)),  # type: ignore[arg-type]
        NetPolicy(allow=tuple(AllowRule(cidr=f"10.0.{i}.0/24") for i in range(65))),
        NetPolicy(peers=("Bad Name",)),
        NetPolicy(groups=("g;drop",)),
        NetPolicy(inbound_ports=(70000,)),
        NetPolicy(inbound_ports=(0,)),
    ],
)
def test_policies_built_in_code_are_checked(policy: NetPolicy) -> None:
    with pytest.raises(InvalidNetInput):
        check_policy(policy)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"egress": "yes"}',
        b'{"inbound_ports": [65536]}',
        b'{"allow": [{"cidr": "10.0.0.0/8", "ports": [[1, 70000]]}]}',
        b'{"allow": [{"cidr": "10.0.0.0/8", "protocol": "sctp"}]}',
        b'{"unknown": 1}',
        b'{"peers": [' + b",".join([b'"a"'] * 65) + b"]}",
    ],
)
def test_decoding_refuses_out_of_bounds(raw: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=NetPolicy)


@pytest.mark.parametrize("port", [1, 22, 80, 443, 1023])
def test_privileged_forward_refused(port: int) -> None:
    with pytest.raises(InvalidNetInput, match="privileged"):
        check_forward(Forward(host_port=port, guest_port=80), 1024)


def test_forward_protocol_checked() -> None:
    with pytest.raises(InvalidNetInput):
        check_forward(Forward(host_port=2000, guest_port=80, protocol="icmp"), 1024)  # type: ignore[arg-type]
    assert check_forward(Forward(host_port=1024, guest_port=1), 1024).host_port == 1024


@pytest.mark.parametrize(
    "cfg",
    [
        NetConfig(bridge="br agentiso"),
        NetConfig(bridge="br-agentiso-too-long"),
        NetConfig(bridge="ai-bridge"),  # starts with the TAP prefix
        NetConfig(subnet="10.42.0.1/16"),
        NetConfig(subnet="10.0.0.0/7"),
        NetConfig(subnet="10.42.0.0/30"),
        NetConfig(gateway="10.43.0.1"),
        NetConfig(gateway="10.42.0.0"),
        NetConfig(gateway="10.42.255.255"),
        NetConfig(dns=("8.8.8",)),
        NetConfig(blocked=("169.254.0.1/16",)),
    ],
)
def test_bad_configs(cfg: NetConfig) -> None:
    with pytest.raises(NetConfigError) as exc:
        parse_net_config(cfg)
    assert isinstance(exc.value, NetError)


def test_tap_prefix_pattern_enforced_on_decode() -> None:
    for prefix in ["", "ai*", "toolong-", "A-", "a b"]:
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"tap_prefix": prefix}, NetConfig)


def test_default_config() -> None:
    s = parse_net_config(NetConfig())
    assert s.bridge == "br-agentiso"
    assert str(s.subnet) == "10.42.0.0/16"
    assert str(s.gateway) == "10.42.0.1"
    assert s.prefixlen == 16
