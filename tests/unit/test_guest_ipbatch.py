"""``ip -batch -`` input for the guest's network steps (guest/netconfig.py):
one ip process instead of one per command, and nothing but plain words."""

from __future__ import annotations

import pytest

from agentiso.guest.identity import network_commands
from agentiso.guest.netconfig import ip_batch, ip_commands
from agentiso.protocol import guest as gp


def test_the_batch_is_the_commands_in_order() -> None:
    req = gp.ConfigureNetwork(id=1, interface="eth0", address="10.42.0.9", prefix=16,
                              gateway="10.42.0.1", mtu=1400)
    cmds = ip_commands(req, "eth0")
    script = ip_batch(cmds).decode()
    assert script.splitlines() == [" ".join(c[1:]) for c in cmds]
    assert script.endswith("\n")
    re = gp.Reidentify(id=1, mac="52:54:00:0a:2a:00", address="10.42.0.9", prefix=16,
                       gateway="10.42.0.1", dns=[], hostname="h", machine_id="1" * 32,
                       entropy=b"x" * 64, time_ns=1, old_mac="52:54:00:0a:2a:07")
    lines = ip_batch(network_commands(re, "eth0")).decode().splitlines()
    assert lines[:2] == ["link set dev eth0 down", "link set dev eth0 address 52:54:00:0a:2a:00"]


@pytest.mark.parametrize("argv", [
    ["ip", "link", "set", "dev", "eth0\naddr flush dev eth1"],  # a second command
    ["ip", "addr", "add", "10.0.0.1/8 dev eth1"],
    ["ip", "link", "set", "dev", ""],
    ["ip", "link", "set", "dev", "eth0#"],
    ["ip", "link", "set", "dev", 'eth"0'],
    ["ip", "link", "set", "dev", "eth\\0"],
    ["sh", "-c", "true"],  # not ip
    ["ip"],
])
def test_anything_but_plain_ip_words_is_refused(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        ip_batch([["ip", "link", "set", "dev", "eth0", "up"], argv])
