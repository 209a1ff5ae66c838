"""Port-in-use detection for forwards (privhelper/net/ports.py): the pure
parsers on captured text, and the live probe against real sockets of this
process (any address, IPv4 or IPv6, TCP or UDP)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from agentiso.privhelper.net.ports import (
    foreign_redirects_of,
    port_unavailable,
    sockets_on_port,
)

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:BEEF 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
"""  # noqa: E501
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  101: 0100007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0000000000000000 0
garbage line
"""  # noqa: E501


def test_tcp_listeners_only_count() -> None:
    assert sockets_on_port(TCP6, 0x1F90, listen_only=True) == ["00000000000000000000000001000000"]
    # A connection from port 0xBEEF is no listener: the port takes no one's traffic.
    assert sockets_on_port(TCP6, 0xBEEF, listen_only=True) == []
    assert sockets_on_port(TCP6, 80, listen_only=True) == []


def test_any_bound_udp_socket_counts() -> None:
    assert sockets_on_port(UDP, 5353, listen_only=False) == ["0100007F"]
    assert sockets_on_port(UDP, 5354, listen_only=False) == []


def _rule(table: str, *expr: Any, family: str = "ip") -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": "c", "expr": list(expr)}}


def _dport(right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                      "right": right}}


DNAT = {"dnat": {"addr": "172.17.0.2", "port": 80}}


@pytest.mark.parametrize(
    ("rule", "port", "hit"),
    [
        (_rule("nat", _dport(8080), DNAT), 8080, True),
        (_rule("nat", _dport(8080), DNAT), 8081, False),
        (_rule("nat", _dport({"set": [1, {"range": [8000, 8100]}]}), DNAT), 8050, True),
        (_rule("nat", _dport({"set": [1, {"range": [8000, 8100]}]}), DNAT), 8101, False),
        (_rule("nat", _dport(8080), {"redirect": {"port": 3128}}), 8080, True),
        (_rule("nat", _dport(8080), {"tproxy": {"port": 1}}), 8080, True),
        # No port match at all: the rule redirects every port.
        (_rule("nat", {"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                 "right": "eth0"}}, DNAT), 12345, True),
        # A negated port match redirects nearly every port: counted.
        (_rule("nat", _dport(22, "!="), DNAT), 8080, True),
        # Not a redirecting rule.
        (_rule("filter", _dport(8080), {"accept": None}), 8080, False),
        # Our own table is the manager's business (it checks its state).
        (_rule("agentiso", _dport(8080), DNAT, family="inet"), 8080, False),
    ],
)
def test_foreign_redirects(rule: dict[str, Any], port: int, hit: bool) -> None:
    doc = {"nftables": [{"metainfo": {}}, {"table": {"name": "nat"}}, rule]}
    assert bool(foreign_redirects_of(doc, port)) is hit


def test_foreign_redirects_survive_odd_json() -> None:
    odd: dict[str, Any] = {"nftables": [1, "x", {"rule": "no"}, {"rule": {"expr": "no"}},
                                        _rule("nat", _dport(True), DNAT)]}
    assert foreign_redirects_of(odd, 1) == ["ip nat/c"]  # a bool is no port: counted as "all"


@pytest.fixture
def ipv6() -> Iterator[None]:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    yield


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("family", "addr", "kind"),
    [
        (socket.AF_INET6, "::1", socket.SOCK_STREAM),  # the acceptance case
        (socket.AF_INET6, "::", socket.SOCK_STREAM),
        (socket.AF_INET, "127.0.0.1", socket.SOCK_STREAM),
        (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
        (socket.AF_INET, "127.0.0.1", socket.SOCK_DGRAM),
    ],
)
def test_live_probe_sees_a_holder_on_any_address(
    ipv6: None, family: int, addr: str, kind: int
) -> None:
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    for _ in range(5):  # a race with another process for the port: try another
        port = _free_port(kind)
        holder = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            holder.bind((addr, port))
        except OSError:
            holder.close()
            continue
        break
    else:
        pytest.fail("no free port found")
    with holder:
        if kind == socket.SOCK_STREAM:
            holder.listen()
        why = port_unavailable(port, proto)
        assert why is not None and "socket is bound" in why
    assert port_unavailable(port, proto) is None


def test_live_probe_consults_the_ruleset() -> None:
    port = _free_port(socket.SOCK_STREAM)
    doc = {"nftables": [_rule("nat", _dport(port), DNAT)]}
    why = port_unavailable(port, "tcp", lambda: doc)
    assert why is not None and "ip nat/c" in why
    assert port_unavailable(port, "tcp", lambda: {"nftables": []}) is None
