"""rtnetlink in the agent's own process: link, address, route and neighbour
requests on a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket, stdlib only.

Why: right after a template's memory is resumed under TCG every code path is
cold, and running ``ip`` (fork, exec, ld.so, libc, iproute2) was most of the
time a VM took to re-identify.  The same requests sent from the agent cost a
few system calls.

The message builders and parsers are pure functions (tested without root);
:class:`Client` is the thin synchronous adapter.  The kernel answers an
rtnetlink request inside the ``send`` call, so a blocking socket with a short
timeout never waits in practice.

Layouts (``<linux/netlink.h>``, ``<linux/rtnetlink.h>``, ``<linux/if_addr.h>``,
``<linux/neighbour.h>``), native byte order:

- ``nlmsghdr``: u32 len, u16 type, u16 flags, u32 seq, u32 pid;
- ``ifinfomsg``: u8 family, u8 pad, u16 type, i32 index, u32 flags, u32 change;
- ``ifaddrmsg``: u8 family, u8 prefixlen, u8 flags, u8 scope, u32 index;
- ``rtmsg``: u8 family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags;
- ``ndmsg``: u8 family, 3 pad, i32 ifindex, u16 state, u8 flags, u8 type;
- ``rtattr``: u16 len, u16 type, data, padded to 4 bytes;
- ``nlmsgerr``: i32 error (0: an ACK, else -errno), then the request's header.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

from agentiso.protocol.errors import ErrorCode

from .errors import Failed, from_oserror

NETLINK_ROUTE = 0
# socket options (SOL_NETLINK)
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# message types
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30

# header flags
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an error reply: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # in an error reply: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_OIF = 4
RTA_GATEWAY = 5
NDA_DST = 1
NDA_IFINDEX = 8
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")
RTATTR = struct.Struct("=HH")
ERRNO = struct.Struct("=i")

RECV_BYTES = 65536  # a dump's datagrams are at most 32 KiB
TIMEOUT_S = 5.0


def _align(n: int) -> int:
    return (n + 3) & ~3


class Message(NamedTuple):
    """One netlink message: header fields and the body after the header.
    (A NamedTuple, not a dataclass: the agent imports this module at start,
    and a dataclass compiles its methods at import, which costs boot time.)"""

    type: int
    flags: int
    seq: int
    body: bytes


# ---- builders (pure) ----------------------------------------------------------

def rtattr(kind: int, data: bytes) -> bytes:
    """One attribute, padded to a 4-byte boundary."""
    length = RTATTR.size + len(data)
    return RTATTR.pack(length, kind) + data + b"\0" * (_align(length) - length)


def nlmsg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A whole message: header (``pid`` 0: to the kernel) and body."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def ifinfomsg(index: int, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def ifaddrmsg(family: int, prefixlen: int, index: int, flags: int = 0, scope: int = 0) -> bytes:
    return IFADDRMSG.pack(family, prefixlen, flags, scope, index)


def rtmsg(family: int, dst_len: int = 0, table: int = RT_TABLE_MAIN,
          protocol: int = RTPROT_BOOT, scope: int = RT_SCOPE_UNIVERSE,
          kind: int = RTN_UNICAST) -> bytes:
    return RTMSG.pack(family, dst_len, 0, 0, table, protocol, scope, kind, 0)


def ndmsg(family: int, ifindex: int, state: int = 0) -> bytes:
    return NDMSG.pack(family, ifindex, state, 0, 0)


def mac_bytes(mac: str) -> bytes:
    """``52:54:0a:2a:00:09`` -> 6 bytes; ValueError for anything else."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def ip_bytes(address: str) -> tuple[int, bytes]:
    """(address family, packed address) of IPv4 or IPv6 text; ValueError
    (not OSError) for anything else."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, address)
        except OSError:
            continue
    raise ValueError(f"not an IP address: {address!r}")


# A request: (type, flags without REQUEST/ACK, body).
Request = tuple[int, int, bytes]


def link_set(index: int, *, up: bool | None = None, mac: str | None = None,
             mtu: int | None = None) -> Request:
    """``ip link set dev X {up|down} | address MAC | mtu N``: one of them per
    request, in the order the caller sends them (the kernel applies a MAC
    before the flags within one request, and not every driver takes a new
    MAC while the link is up)."""
    flags = change = 0
    if up is not None:
        change = IFF_UP
        flags = IFF_UP if up else 0
    attrs = b""
    if mac is not None:
        attrs += rtattr(IFLA_ADDRESS, mac_bytes(mac))
    if mtu is not None:
        attrs += rtattr(IFLA_MTU, struct.pack("=I", mtu))
    return RTM_SETLINK, 0, ifinfomsg(index, flags, change) + attrs


def addr_add(index: int, address: str, prefix: int) -> Request:
    """``ip addr add A/P dev X``: local and peer address both A, scope global
    (IPv4 or IPv6, by A).  EEXIST if the device has it already, as ``ip``
    fails."""
    family, raw = ip_bytes(address)
    body = (ifaddrmsg(family, prefix, index)
            + rtattr(IFA_LOCAL, raw) + rtattr(IFA_ADDRESS, raw))
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def route_replace_default(index: int, gateway: str) -> Request:
    """``ip route replace default via G dev X`` (main table, proto boot; the
    route's family is the gateway's)."""
    family, raw = ip_bytes(gateway)
    body = (rtmsg(family) + rtattr(RTA_GATEWAY, raw)
            + rtattr(RTA_OIF, struct.pack("=i", index)))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body


def addr_dump() -> Request:
    """Every address of every family (``ip addr flush`` without ``-4``/``-6``)."""
    return RTM_GETADDR, NLM_F_DUMP, ifaddrmsg(socket.AF_UNSPEC, 0, 0)


def neigh_dump(index: int) -> Request:
    """Neighbours of every family; the kernel filters by ``NDA_IFINDEX``
    where it can, and :func:`neighbours_to_flush` filters again."""
    return (RTM_GETNEIGH, NLM_F_DUMP,
            ndmsg(socket.AF_UNSPEC, 0) + rtattr(NDA_IFINDEX, struct.pack("=I", index)))


# ---- parsers (pure) -----------------------------------------------------------

def parse_messages(buf: bytes) -> list[Message]:
    """The messages in one datagram; ValueError if one overruns it."""
    out: list[Message] = []
    off = 0
    while off + NLMSGHDR.size <= len(buf):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(buf, off)
        if length < NLMSGHDR.size or off + length > len(buf):
            raise ValueError(f"netlink message of {length} bytes at {off} overruns "
                             f"the {len(buf)}-byte datagram")
        out.append(Message(kind, flags, seq, bytes(buf[off + NLMSGHDR.size:off + length])))
        off += _align(length)
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """type -> payload of a run of attributes (the last of a repeated type
    wins; nested-flag bits are masked off).  Stops at a truncated one."""
    out: dict[int, bytes] = {}
    off = 0
    while off + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, off)
        if length < RTATTR.size or off + length > len(data):
            break
        out[kind & 0x3FFF] = data[off + RTATTR.size:off + length]
        off += _align(length)
    return out


def parse_error(msg: Message) -> tuple[int, str]:
    """(errno, the kernel's extended-ACK text or "") of an ``NLMSG_ERROR``;
    errno 0 is an ACK."""
    if len(msg.body) < ERRNO.size:
        raise ValueError("truncated netlink error message")
    (err,) = ERRNO.unpack_from(msg.body)
    text = ""
    if msg.flags & NLM_F_ACK_TLVS and len(msg.body) >= ERRNO.size + NLMSGHDR.size:
        # The echoed request: its header only when capped, else all of it.
        echoed = NLMSGHDR.size
        if not msg.flags & NLM_F_CAPPED:
            (echoed,) = struct.unpack_from("=I", msg.body, ERRNO.size)
        tlvs = parse_attrs(msg.body[ERRNO.size + _align(echoed):])
        text = tlvs.get(NLMSGERR_ATTR_MSG, b"").split(b"\0", 1)[0].decode(errors="replace")
    return -err, text


def addresses_to_flush(replies: list[Message], index: int) -> list[bytes]:
    """The bodies to send back as ``RTM_DELADDR`` for the addresses of
    ``index`` in a dump (as ``ip addr flush`` does: the dumped message
    itself identifies the address)."""
    out = []
    for msg in replies:
        if msg.type != RTM_NEWADDR or len(msg.body) < IFADDRMSG.size:
            continue
        if IFADDRMSG.unpack_from(msg.body)[4] == index:
            out.append(msg.body)
    return out


def neighbours_to_flush(replies: list[Message], index: int) -> list[bytes]:
    """``RTM_DELNEIGH`` bodies for the neighbours of ``index`` in a dump that
    ``ip neigh flush dev`` removes: all but permanent and NOARP entries."""
    out = []
    for msg in replies:
        if msg.type != RTM_NEWNEIGH or len(msg.body) < NDMSG.size:
            continue
        family, ifindex, state, _flags, _kind = NDMSG.unpack_from(msg.body)
        if ifindex != index or state & (NUD_PERMANENT | NUD_NOARP):
            continue
        dst = parse_attrs(msg.body[NDMSG.size:]).get(NDA_DST)
        if dst is not None:
            out.append(ndmsg(family, ifindex) + rtattr(NDA_DST, dst))
    return out


# ---- the adapter ----------------------------------------------------------------

class Client:
    """A synchronous rtnetlink socket.  Each :meth:`request` waits for the
    kernel's ACK; an error reply raises :class:`Failed` with the errno's
    code (as :func:`from_oserror`) and the kernel's own words where it gives
    them.  Use as a context manager."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        try:
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:  # an older kernel: plain errors, still correct
                    pass
            self._sock.settimeout(timeout_s)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, req: Request, what: str, ignore: tuple[int, ...] = ()) -> None:
        """Send ``req`` with ``NLM_F_ACK`` and wait for the ACK.  Errnos in
        ``ignore`` count as done (e.g. an entry that vanished meanwhile)."""
        kind, flags, body = req
        seq = self._send(kind, flags | NLM_F_ACK, body)
        for msg in self._replies(seq, what):
            if msg.type == NLMSG_ERROR:
                self._check(msg, what, ignore)
                return

    def dump(self, req: Request, what: str) -> list[Message]:
        """Send a dump request; every message up to ``NLMSG_DONE``."""
        kind, flags, body = req
        seq = self._send(kind, flags, body)
        out: list[Message] = []
        for msg in self._replies(seq, what):
            if msg.type == NLMSG_DONE:
                return out
            if msg.type == NLMSG_ERROR:
                self._check(msg, what, ())
                return out
            out.append(msg)
        return out  # pragma: no cover - _replies only ends by a return above

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self._seq += 1
        self._sock.send(nlmsg(kind, flags | NLM_F_REQUEST, self._seq, body))
        return self._seq

    def _replies(self, seq: int, what: str) -> Iterator[Message]:
        """Messages answering ``seq`` (stale ones are skipped), datagram by
        datagram, until the caller stops."""
        while True:
            try:
                buf = self._sock.recv(RECV_BYTES)
            except TimeoutError:
                raise Failed(ErrorCode.TIMEOUT, f"{what}: no answer from the kernel") from None
            try:
                msgs = parse_messages(buf)
            except ValueError as exc:
                raise Failed(ErrorCode.INTERNAL, f"{what}: {exc}") from None
            for msg in msgs:
                if msg.seq == seq and msg.type != NLMSG_NOOP:
                    yield msg

    @staticmethod
    def _check(msg: Message, what: str, ignore: tuple[int, ...]) -> None:
        try:
            err, text = parse_error(msg)
        except ValueError as exc:
            raise Failed(ErrorCode.INTERNAL, f"{what}: {exc}") from None
        if err == 0 or err in ignore:
            return
        failed = from_oserror(OSError(err, os.strerror(err)), what)
        if text:
            failed = Failed(failed.code, f"{failed.message} ({text})")
        raise failed
