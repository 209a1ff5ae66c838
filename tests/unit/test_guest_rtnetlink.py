"""guest/rtnetlink.py: the agent's own rtnetlink requests.

The builders and parsers are checked byte by byte without root.  The client
and the re-identification's network step (``identity.relink``) run against
the real kernel in a network namespace each test makes with ``unshare -n``
(it ends with the process): ``relink`` must leave a device exactly as the
``ip -batch`` of ``identity.network_commands`` leaves it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from agentiso.guest import rtnetlink as rt
from agentiso.guest.errors import Failed
from agentiso.protocol.errors import ErrorCode


def _attrs(body: bytes, header: int) -> dict[int, bytes]:
    return rt.parse_attrs(body[header:])


def test_attributes_are_padded_to_four_bytes_and_parse_back() -> None:
    one = rt.rtattr(3, b"abc")
    assert one == struct.pack("=HH", 7, 3) + b"abc\0"
    run = one + rt.rtattr(4, b"") + rt.rtattr(5, b"12345678")
    assert rt.parse_attrs(run) == {3: b"abc", 4: b"", 5: b"12345678"}
    # a truncated last attribute is dropped, not read past the end
    assert rt.parse_attrs(run + struct.pack("=HH", 40, 6) + b"xx") == rt.parse_attrs(run)
    assert rt.parse_attrs(struct.pack("=HH", 2, 6)) == {}  # shorter than its own header


def test_a_message_carries_its_length_and_parses_back() -> None:
    first = rt.nlmsg(rt.RTM_NEWADDR, rt.NLM_F_MULTI, 7, b"abcde")  # 21 bytes, padded to 24
    second = rt.nlmsg(rt.NLMSG_DONE, rt.NLM_F_MULTI, 7, b"\0\0\0\0")
    assert struct.unpack_from("=IHHII", first) == (21, rt.RTM_NEWADDR, rt.NLM_F_MULTI, 7, 0)
    msgs = rt.parse_messages(first + b"\0\0\0" + second)
    assert msgs == [rt.Message(rt.RTM_NEWADDR, rt.NLM_F_MULTI, 7, b"abcde"),
                    rt.Message(rt.NLMSG_DONE, rt.NLM_F_MULTI, 7, b"\0\0\0\0")]


@pytest.mark.parametrize("buf", [
    struct.pack("=IHHII", 40, rt.NLMSG_DONE, 0, 1, 0),  # says 40 bytes, has 16
    struct.pack("=IHHII", 8, rt.NLMSG_DONE, 0, 1, 0),  # shorter than a header
])
def test_a_message_that_overruns_its_datagram_is_refused(buf: bytes) -> None:
    with pytest.raises(ValueError):
        rt.parse_messages(buf)


def test_link_requests() -> None:
    kind, flags, body = rt.link_set(5, up=False)
    assert (kind, flags) == (rt.RTM_SETLINK, 0)
    assert struct.unpack("=BxHiII", body) == (socket.AF_UNSPEC, 0, 5, 0, rt.IFF_UP)
    _, _, body = rt.link_set(5, up=True)
    assert struct.unpack("=BxHiII", body) == (socket.AF_UNSPEC, 0, 5, rt.IFF_UP, rt.IFF_UP)
    _, _, body = rt.link_set(5, mac="52:54:0A:2A:00:09")
    assert struct.unpack_from("=BxHiII", body)[3:] == (0, 0)  # flags untouched
    assert _attrs(body, 16) == {rt.IFLA_ADDRESS: bytes.fromhex("52540a2a0009")}
    _, _, body = rt.link_set(5, mtu=1400)
    assert _attrs(body, 16) == {rt.IFLA_MTU: struct.pack("=I", 1400)}


@pytest.mark.parametrize("mac", ["52:54:0a:2a:00", "52:54:0a:2a:00:09:01", "5254.0a2a.0009",
                                 "52:54:0a:2a:00:9", "52:54:0a:2a:00:zz", ""])
def test_a_malformed_mac_is_refused(mac: str) -> None:
    with pytest.raises(ValueError):
        rt.link_set(1, mac=mac)


@pytest.mark.parametrize("address", ["10.42.0", "10.42.0.256", "fe80::1%eth0", "", "x"])
def test_a_malformed_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError):
        rt.addr_add(1, address, 16)
    with pytest.raises(ValueError):
        rt.route_replace_default(1, address)


def test_address_and_route_requests() -> None:
    kind, flags, body = rt.addr_add(3, "10.42.0.9", 16)
    assert (kind, flags) == (rt.RTM_NEWADDR, rt.NLM_F_CREATE | rt.NLM_F_EXCL)
    assert struct.unpack_from("=BBBBI", body) == (socket.AF_INET, 16, 0, 0, 3)
    raw = socket.inet_aton("10.42.0.9")
    assert _attrs(body, 8) == {rt.IFA_LOCAL: raw, rt.IFA_ADDRESS: raw}
    _, _, body = rt.addr_add(3, "fd00::9", 64)
    assert struct.unpack_from("=BBBBI", body) == (socket.AF_INET6, 64, 0, 0, 3)
    assert _attrs(body, 8)[rt.IFA_LOCAL] == socket.inet_pton(socket.AF_INET6, "fd00::9")

    kind, flags, body = rt.route_replace_default(3, "10.42.0.1")
    assert (kind, flags) == (rt.RTM_NEWROUTE, rt.NLM_F_CREATE | rt.NLM_F_REPLACE)
    assert struct.unpack_from("=BBBBBBBBI", body) == (
        socket.AF_INET, 0, 0, 0, rt.RT_TABLE_MAIN, rt.RTPROT_BOOT, rt.RT_SCOPE_UNIVERSE,
        rt.RTN_UNICAST, 0)
    assert _attrs(body, 12) == {rt.RTA_GATEWAY: socket.inet_aton("10.42.0.1"),
                                rt.RTA_OIF: struct.pack("=i", 3)}
    _, _, body = rt.route_replace_default(3, "fd00::1")
    assert body[0] == socket.AF_INET6


def _error(err: int, flags: int = 0, tail: bytes = b"") -> rt.Message:
    echoed = rt.nlmsg(rt.RTM_NEWADDR, rt.NLM_F_REQUEST | rt.NLM_F_ACK, 4, b"")
    return rt.Message(rt.NLMSG_ERROR, flags, 4, struct.pack("=i", err) + echoed + tail)


def test_acks_errors_and_the_kernels_own_words() -> None:
    assert rt.parse_error(_error(0)) == (0, "")
    assert rt.parse_error(_error(-errno.EEXIST)) == (errno.EEXIST, "")
    tlv = rt.rtattr(rt.NLMSGERR_ATTR_MSG, b"Address already assigned\0")
    capped = _error(-errno.EEXIST, rt.NLM_F_CAPPED | rt.NLM_F_ACK_TLVS, tlv)
    assert rt.parse_error(capped) == (errno.EEXIST, "Address already assigned")
    # Not capped: the whole request is echoed (here with an 8-byte body) before the TLVs.
    whole = rt.nlmsg(rt.RTM_NEWADDR, rt.NLM_F_REQUEST, 4, b"\1" * 8)
    uncapped = rt.Message(rt.NLMSG_ERROR, rt.NLM_F_ACK_TLVS, 4,
                          struct.pack("=i", -errno.EINVAL) + whole + tlv)
    assert rt.parse_error(uncapped) == (errno.EINVAL, "Address already assigned")
    with pytest.raises(ValueError):
        rt.parse_error(rt.Message(rt.NLMSG_ERROR, 0, 4, b"\0\0"))


def test_an_error_reply_becomes_the_agents_typed_error() -> None:
    rt.Client._check(_error(0), "x", ())  # an ACK
    rt.Client._check(_error(-errno.ENOENT), "x", (errno.ENOENT,))  # ignored on request
    tlv = rt.rtattr(rt.NLMSGERR_ATTR_MSG, b"Address already assigned\0")
    with pytest.raises(Failed) as info:
        rt.Client._check(_error(-errno.EEXIST, rt.NLM_F_CAPPED | rt.NLM_F_ACK_TLVS, tlv),
                         "address 10.42.0.9/16 on eth0", ())
    assert info.value.code == ErrorCode.ALREADY_EXISTS
    assert info.value.message == ("address 10.42.0.9/16 on eth0: File exists "
                                  "(Address already assigned)")
    with pytest.raises(Failed) as info:
        rt.Client._check(_error(-errno.EPERM), "link down on eth0", ())
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(Failed) as info:
        rt.Client._check(rt.Message(rt.NLMSG_ERROR, 0, 1, b""), "x", ())
    assert info.value.code == ErrorCode.INTERNAL


def _addr(index: int, address: str, prefix: int, kind: int = rt.RTM_NEWADDR) -> rt.Message:
    return rt.Message(kind, rt.NLM_F_MULTI, 1, rt.addr_add(index, address, prefix)[2])


def test_the_addresses_to_flush_are_the_devices_own() -> None:
    dump = [_addr(2, "10.42.0.9", 16), _addr(3, "10.9.0.1", 24), _addr(2, "fd00::9", 64),
            _addr(2, "10.42.0.10", 16, kind=rt.NLMSG_NOOP),
            rt.Message(rt.RTM_NEWADDR, 0, 1, b"\2\0")]  # too short for an ifaddrmsg
    assert rt.addresses_to_flush(dump, 2) == [dump[0].body, dump[2].body]
    assert rt.addresses_to_flush(dump, 9) == []


def _neigh(index: int, state: int, dst: bytes | None = b"\x0a\x2a\0\1") -> rt.Message:
    attrs = rt.rtattr(rt.NDA_DST, dst) if dst is not None else b""
    body = rt.ndmsg(socket.AF_INET, index, state) + attrs + rt.rtattr(2, b"\x52" * 6)
    return rt.Message(rt.RTM_NEWNEIGH, rt.NLM_F_MULTI, 1, body)


def test_the_neighbours_to_flush_are_as_ip_neigh_flush_dev() -> None:
    stale, reach = 0x04, 0x02
    dump = [_neigh(2, stale), _neigh(2, reach, b"\x0a\x2a\0\2"), _neigh(2, rt.NUD_PERMANENT),
            _neigh(2, rt.NUD_NOARP), _neigh(3, stale), _neigh(2, stale, None)]
    bodies = rt.neighbours_to_flush(dump, 2)
    assert bodies == [rt.ndmsg(socket.AF_INET, 2) + rt.rtattr(rt.NDA_DST, b"\x0a\x2a\0\1"),
                      rt.ndmsg(socket.AF_INET, 2) + rt.rtattr(rt.NDA_DST, b"\x0a\x2a\0\2")]


# ---- the real kernel, in a network namespace of the test's own -----------------

_NETNS_SKIP = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare(1) and ip(8) to make a network namespace with a veth pair",
)

# Run in a new network namespace: a veth pair whose peer is down (no
# carrier, as a fork's NIC while the host keeps its link down) with an old
# identity on it, then one of the two ways of re-identifying it, then the
# device's state as JSON.
_RELINK_SCRIPT = r"""
import json, subprocess, sys
from agentiso.guest import identity
from agentiso.guest.errors import Failed
from agentiso.protocol import guest as gp

def ip(*args, json_out=False):
    out = subprocess.run(["ip", *(["-j"] if json_out else []), *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out) if json_out else out

mode, gateway = sys.argv[1], sys.argv[2] or None
for cmd in ("link add v0 type veth peer name v1", "link set dev v0 address 52:54:0a:2a:00:02",
            "link set dev v0 up", "addr add 10.42.0.2/16 dev v0",
            "addr add 10.42.0.3/16 dev v0", "addr add 10.7.0.2/24 dev v0",
            "addr add fd00::2/64 dev v0 nodad", "route add default via 10.42.0.1 dev v0",
            "neigh add 10.42.0.1 lladdr 52:54:0a:2a:00:01 dev v0 nud stale",
            "neigh add 10.42.0.5 lladdr 52:54:0a:2a:00:05 dev v0 nud permanent"):
    ip(*cmd.split())
req = gp.Reidentify(id=1, mac="52:54:0A:2A:00:09", address="10.42.0.9", prefix=16,
                    gateway=gateway, hostname="h", machine_id="1" * 32, entropy=b"e" * 32,
                    time_ns=1, old_mac="52:54:0a:2a:00:02")
error = None
if mode == "ip":
    script = "".join(" ".join(c[1:]) + "\n" for c in identity.network_commands(req, "v0"))
    run = subprocess.run(["ip", "-batch", "-"], input=script, capture_output=True, text=True)
    error = run.stderr.strip() if run.returncode else None
else:
    try:
        identity.relink(req, "v0")
    except Failed as exc:
        error = f"{exc.code}: {exc.message}"
link = ip("link", "show", "dev", "v0", json_out=True)[0]
print(json.dumps({
    "error": error,
    "link": {k: link.get(k) for k in ("address", "mtu", "flags")},
    "addr": [{k: a.get(k) for k in ("family", "local", "prefixlen", "scope")}
             for a in ip("addr", "show", "dev", "v0", json_out=True)[0]["addr_info"]],
    "route4": ip("-4", "route", "show", "table", "all", json_out=True),
    "route6": [r for r in ip("-6", "route", "show", "table", "all", json_out=True)
               if r.get("dev") == "v0"],
    "neigh": ip("neigh", "show", "dev", "v0", json_out=True),
}))
"""


def _in_netns(script: str, *args: str) -> str:
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", script, *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@_NETNS_SKIP
@pytest.mark.parametrize("gateway", ["10.42.0.1", ""])
def test_relink_leaves_the_device_as_the_ip_commands_do(gateway: str) -> None:
    by_ip = json.loads(_in_netns(_RELINK_SCRIPT, "ip", gateway))
    by_netlink = json.loads(_in_netns(_RELINK_SCRIPT, "netlink", gateway))
    assert by_ip["error"] is None and by_netlink["error"] is None
    assert by_netlink == by_ip
    # and that state is the new identity, nothing of the old one
    assert by_ip["link"]["address"] == "52:54:0a:2a:00:09"
    assert "UP" in by_ip["link"]["flags"]
    assert by_ip["addr"] == [{"family": "inet", "local": "10.42.0.9", "prefixlen": 16,
                              "scope": "global"}]
    defaults = [(r.get("gateway"), r["dev"]) for r in by_ip["route4"] if r["dst"] == "default"]
    assert defaults == ([(gateway, "v0")] if gateway else [])
    assert by_ip["neigh"] == []


@_NETNS_SKIP
def test_relink_stops_at_the_first_failure_and_names_it() -> None:
    # A gateway outside the new address's network: the kernel refuses the
    # route, as it refuses ``ip route replace``.
    by_ip = json.loads(_in_netns(_RELINK_SCRIPT, "ip", "192.0.2.1"))
    by_netlink = json.loads(_in_netns(_RELINK_SCRIPT, "netlink", "192.0.2.1"))
    assert by_ip["error"] and by_netlink["error"]
    assert "default route via 192.0.2.1 on v0" in by_netlink["error"]
    assert {k: v for k, v in by_netlink.items() if k != "error"} == \
        {k: v for k, v in by_ip.items() if k != "error"}


_CLIENT_SCRIPT = r"""
import errno, json, socket, subprocess
from agentiso.guest import rtnetlink as rt
from agentiso.guest.errors import Failed

def ip(*args):
    subprocess.run(["ip", *args], check=True)

ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
ip("link", "set", "dev", "v0", "up")
for dst, nud in (("10.42.0.1", "stale"), ("10.42.0.2", "reachable"), ("10.42.0.5", "permanent")):
    ip("neigh", "add", dst, "lladdr", "52:54:0a:2a:00:01", "dev", "v0", "nud", nud)
index = socket.if_nametoindex("v0")
out = {}
with rt.Client() as nl:
    nl.request(rt.addr_add(index, "10.42.0.9", 16), "add")
    try:
        nl.request(rt.addr_add(index, "10.42.0.9", 16), "add again")
    except Failed as exc:
        out["again"] = [str(exc.code), exc.message]
    nl.request(rt.addr_add(index, "10.42.0.9", 16), "ignored", ignore=(errno.EEXIST,))
    try:
        nl.request(rt.link_set(index + 100, up=True), "no such link")
    except Failed as exc:
        out["nolink"] = [str(exc.code), exc.message]
    dump = nl.dump(rt.neigh_dump(index), "dump")
    for body in rt.neighbours_to_flush(dump, index):
        nl.request((rt.RTM_DELNEIGH, 0, body), "flush", ignore=(errno.ENOENT,))
    out["addrs"] = len(rt.addresses_to_flush(nl.dump(rt.addr_dump(), "addrs"), index))
out["neigh"] = json.loads(subprocess.run(["ip", "-j", "neigh", "show", "dev", "v0"],
                                         check=True, capture_output=True, text=True).stdout)
print(json.dumps(out))
"""


@_NETNS_SKIP
def test_the_client_against_the_kernel() -> None:
    out = json.loads(_in_netns(_CLIENT_SCRIPT))
    code, message = out["again"]
    assert code == ErrorCode.ALREADY_EXISTS and message.startswith("add again: File exists")
    assert out["nolink"][1].startswith("no such link: No such device")
    assert out["addrs"] == 1  # the dump found the address on the device (IPv6 waits for carrier)
    # ``ip neigh flush dev`` semantics: the permanent entry stays
    assert [(n["dst"], n["state"]) for n in out["neigh"]] == [("10.42.0.5", ["PERMANENT"])]
