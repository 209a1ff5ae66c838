"""Is a host port free for a forward?  Three looks, each of which can say no.

A DNAT forward steals the port from whatever else would get its traffic, so a
forward is refused when, in the helper's network namespace:

* a socket holds the port on any address, IPv4 or IPv6: a TCP listener, or a
  UDP socket bound to it (read from ``/proc/net/{tcp,tcp6,udp,udp6}``);
* binding the port fails on ``0.0.0.0`` or on ``[::]`` (IPv6-only), which the
  kernel refuses for a listener on any single address too (``127.0.0.1``,
  ``::1``) -- the kernel's own answer, in case the tables missed a socket;
* a DNAT, redirect or tproxy rule of another nft table already takes the port
  (Docker, libvirt, an operator's rules).  Rules of ``iptables-legacy`` are not
  visible to nft and are not seen.

The parsers are pure (tested on captured text); :func:`port_unavailable` is the
adapter that reads the live system.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import NetSystemError
from .ruleset import TABLE

PROC_NET = Path("/proc/net")
TCP_LISTEN = "0A"
#: nft statements that send a port's traffic somewhere else.
_REDIRECTING = ("dnat", "redirect", "tproxy")


# --- pure parsers ------------------------------------------------------------------------


def sockets_on_port(table_text: str, port: int, *, listen_only: bool) -> list[str]:
    """Local addresses (hex, as the kernel prints them) of the sockets in one
    ``/proc/net/{tcp,udp}[6]`` table bound to ``port``; for TCP only listeners
    (``listen_only``): a connection from an ephemeral port takes no one's traffic."""
    found = []
    for line in table_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        addr, _, hexport = fields[1].rpartition(":")
        try:
            bound = int(hexport, 16)
        except ValueError:
            continue
        if bound == port and (not listen_only or fields[3] == TCP_LISTEN):
            found.append(addr)
    return found


def _ports_in(value: Any) -> Iterable[tuple[int, int]]:
    """Port ranges named by the right side of an nft JSON match."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value, value
    elif isinstance(value, dict):
        if "range" in value and isinstance(value["range"], list) and len(value["range"]) == 2:
            lo, hi = value["range"]
            if isinstance(lo, int) and isinstance(hi, int):
                yield lo, hi
        elif "set" in value:
            yield from _ports_in(value["set"])
    elif isinstance(value, list):
        for item in value:
            yield from _ports_in(item)


def _dport_matches(expr: list[Any]) -> list[tuple[str, Any]]:
    """``(op, right)`` of every match on a destination port in a rule."""
    out = []
    for e in expr:
        m = e.get("match") if isinstance(e, dict) else None
        if not isinstance(m, dict):
            continue
        left = m.get("left")
        payload = left.get("payload") if isinstance(left, dict) else None
        if isinstance(payload, dict) and payload.get("field") == "dport":
            out.append((str(m.get("op", "==")), m.get("right")))
    return out


def _may_match(op: str, right: Any, port: int) -> bool:
    """Whether a port match could take ``port``; anything not understood
    (a negation, a named set, a map) counts as yes."""
    ranges = list(_ports_in(right))
    if op not in ("==", "in") or not ranges:
        return True
    return any(lo <= port <= hi for lo, hi in ranges)


def foreign_redirects_of(ruleset: dict[str, Any], port: int) -> list[str]:
    """Where another table's rules already redirect traffic to ``port``: one
    ``family table/chain`` per rule.  A redirecting rule that matches no
    destination port at all takes every port, this one included; a negated or
    otherwise unreadable port match (a named set) is counted too: better a
    refused forward than a stolen port."""
    found = []
    for obj in ruleset.get("nftables", []):
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if not isinstance(rule, dict) or rule.get("table") == TABLE:
            continue
        expr = rule.get("expr")
        if not isinstance(expr, list):
            continue
        if not any(isinstance(e, dict) and any(k in e for k in _REDIRECTING) for e in expr):
            continue
        matches = _dport_matches(expr)
        hit = not matches or any(_may_match(op, right, port) for op, right in matches)
        if hit:
            found.append(f"{rule.get('family')} {rule.get('table')}/{rule.get('chain')}")
    return found


# --- adapters ----------------------------------------------------------------------------


def _bind_refused(family: int, port: int, protocol: str) -> bool:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:  # no IPv6 in this kernel: nothing can hold it
            return False
        raise NetSystemError(f"cannot probe port {protocol}/{port}: {exc}") from None
    with sock:
        if protocol == "tcp":
            # TIME_WAIT leftovers are not "in use"; a listener still refuses the
            # bind.  Never for UDP: two SO_REUSEADDR UDP sockets may share a port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            if exc.errno == errno.EADDRNOTAVAIL:  # IPv6 disabled by sysctl
                return False
            raise NetSystemError(f"cannot probe port {protocol}/{port}: {exc}") from None
    return False


def _proc_sockets(port: int, protocol: str) -> list[str]:
    found = []
    for name in (protocol, protocol + "6"):
        try:
            text = (PROC_NET / name).read_text()
        except FileNotFoundError:  # no IPv6
            continue
        except OSError as exc:
            raise NetSystemError(f"cannot read {PROC_NET / name}: {exc}") from None
        found += sockets_on_port(text, port, listen_only=protocol == "tcp")
    return found


def port_unavailable(
    port: int, protocol: str, ruleset: Callable[[], dict[str, Any]] | None = None
) -> str | None:
    """Why ``protocol/port`` cannot be forwarded on this host, or None if it can.

    ``ruleset`` returns ``nft -j list ruleset`` (parsed); None skips that look.
    """
    held = _proc_sockets(port, protocol)
    if held:
        return f"a socket is bound to it ({len(held)} on IPv4/IPv6 addresses)"
    if _bind_refused(socket.AF_INET, port, protocol):
        return "binding it on 0.0.0.0 fails (something holds it)"
    if _bind_refused(socket.AF_INET6, port, protocol):
        return "binding it on [::] fails (something holds it)"
    if ruleset is not None:
        rules = foreign_redirects_of(ruleset(), port)
        if rules:
            return f"an nft rule already redirects it ({', '.join(rules[:3])})"
    return None


def nft_ruleset_json(nft_list: Callable[[], bytes]) -> Callable[[], dict[str, Any]]:
    """Adapter: parse the output of ``nft -j list ruleset``."""

    def load() -> dict[str, Any]:
        out = nft_list()
        try:
            doc = json.loads(out or b'{"nftables": []}')
        except ValueError as exc:
            raise NetSystemError(f"nft -j list ruleset gave unreadable JSON: {exc}") from None
        return doc if isinstance(doc, dict) else {"nftables": []}

    return load
