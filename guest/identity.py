"""Reidentify: the VM takes a new identity after a resume from another's memory.

A fork resumes with everything the VM that saved the memory had: its MAC and
address, hostname, machine-id, the kernel's random state (two forks would
draw the same "random" bytes) and a clock stopped at the save.  The host
keeps the NIC's link down until this request is answered, so the old
identity never reaches the network.

The pure parts (which interface, the ``rand_pool_info`` struct, the ``ip``
commands the network step is equivalent to) are functions tested without
root; :func:`handle_reidentify` runs them as PID 1.  Each step that fails
answers with an error naming the step.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from . import netconfig, rtnetlink
from .connection import RequestContext
from .errors import Failed, from_oserror
from .system import atomic_write, require_vm, write_hostname_files

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MACHINE_ID = "/etc/machine-id"
SYS_CLASS_NET = "/sys/class/net"
FLUSH_ROUNDS = 10  # as `ip addr flush`


def rand_pool_info(entropy: bytes) -> bytes:
    """``struct rand_pool_info`` for RNDADDENTROPY: bits credited, byte count,
    the bytes.  The host made them with its CSPRNG, so all of them count."""
    return struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy


def interfaces(sys_class_net: str = SYS_CLASS_NET) -> dict[str, str]:
    """name -> MAC (lower case) of every interface but loopback."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return found
    for name in names:
        if name == "lo":
            continue
        try:
            with open(os.path.join(sys_class_net, name, "address")) as f:
                found[name] = f.read().strip().lower()
        except OSError:
            continue
    return found


def pick_interface(nics: dict[str, str], mac: str, old_mac: str | None) -> str | None:
    """The NIC to re-identify: the one with ``old_mac``, else the one that has
    ``mac`` already (a repeated request), else the only one there is."""
    for want in (old_mac, mac):
        if want is None:
            continue
        for name, have in nics.items():
            if have == want.lower():
                return name
    if len(nics) == 1:
        return next(iter(nics))
    return None


def network_commands(req: gp.Reidentify, ifname: str) -> list[list[str]]:
    """What the network step does, as ``ip`` invocations: the new MAC (with
    the link down: not every driver changes it live), then the address and
    route as ConfigureNetwork.  :func:`relink` sends the same requests over
    rtnetlink; this list is its specification, and a test runs both in a
    network namespace and compares the result."""
    conf = gp.ConfigureNetwork(
        id=req.id, address=req.address, prefix=req.prefix, interface=ifname,
        gateway=req.gateway, dns=req.dns,
    )
    return [
        ["ip", "link", "set", "dev", ifname, "down"],
        ["ip", "link", "set", "dev", ifname, "address", req.mac.lower()],
        ["ip", "neigh", "flush", "dev", ifname],
        *netconfig.ip_commands(conf, ifname),
    ]


def relink(req: gp.Reidentify, ifname: str) -> None:
    """Do what :func:`network_commands` says, in this process over rtnetlink
    (no ``ip``: spawning it was most of a template create's re-identification
    under TCG).  Stops at the first request that fails, with a
    :class:`Failed` naming it, as ``ip -batch`` stops; blocking, but each
    request is answered within the kernel's ``send``."""
    index = socket.if_nametoindex(ifname)
    on = f"on {ifname}"
    with rtnetlink.Client() as nl:
        nl.request(rtnetlink.link_set(index, up=False), f"link down {on}")
        nl.request(rtnetlink.link_set(index, mac=req.mac.lower()), f"MAC {req.mac} {on}")
        # Taking the link down flushes its neighbours already; flushing
        # explicitly as `ip neigh flush` did costs one empty dump.
        found = nl.dump(rtnetlink.neigh_dump(index), f"neighbour dump {on}")
        for body in rtnetlink.neighbours_to_flush(found, index):
            nl.request((rtnetlink.RTM_DELNEIGH, 0, body), f"neighbour flush {on}",
                       ignore=(errno.ENOENT,))
        nl.request(rtnetlink.link_set(index, up=True), f"link up {on}")
        _flush_addresses(nl, index, on)
        nl.request(rtnetlink.addr_add(index, req.address, req.prefix),
                   f"address {req.address}/{req.prefix} {on}")
        if req.gateway is not None:
            nl.request(rtnetlink.route_replace_default(index, req.gateway),
                       f"default route via {req.gateway} {on}")


def _flush_addresses(nl: rtnetlink.Client, index: int, on: str) -> None:
    """``ip addr flush dev``: every address of every family, in rounds as
    ``ip`` does (deleting a primary IPv4 address takes or promotes its
    secondaries, so one dump may list addresses that are gone)."""
    for _ in range(FLUSH_ROUNDS):
        found = rtnetlink.addresses_to_flush(nl.dump(rtnetlink.addr_dump(), f"address dump {on}"),
                                             index)
        if not found:
            return
        for body in found:
            nl.request((rtnetlink.RTM_DELADDR, 0, body), f"address flush {on}",
                       ignore=(errno.EADDRNOTAVAIL,))
    raise Failed(ErrorCode.CONFLICT,
                 f"addresses {on} still there after {FLUSH_ROUNDS} flush rounds")


def _reseed(entropy: bytes) -> None:
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, rand_pool_info(entropy))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _write_machine_id(machine_id: str) -> None:
    atomic_write(MACHINE_ID, machine_id + "\n")
    os.chmod(MACHINE_ID, 0o444)


async def _step(name: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run one step; any failure becomes an error naming it."""
    try:
        await fn()
    except Failed as exc:
        raise Failed(exc.code, f"reidentify step {name!r} failed: {exc.message}") from None
    except OSError as exc:
        err = from_oserror(exc)
        raise Failed(err.code, f"reidentify step {name!r} failed: {err.message}") from None


async def handle_reidentify(req: gp.Reidentify, ctx: RequestContext) -> gp.Ok:
    require_vm(ctx, "taking a new identity")

    # Every step runs inline in the event loop, without asyncio.to_thread:
    # right after a resume under TCG a hop to the executor's thread (spawn
    # or wake it, switch to it and back, all of it cold) costs more than the
    # blocking it would spare, which is a few writes of a few bytes to
    # local files, an ioctl and some netlink messages.  Nothing else is in
    # flight while a VM takes its identity: the host sends nothing else
    # until this is answered.
    async def entropy() -> None:
        _reseed(req.entropy)

    async def clock() -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, req.time_ns)

    async def machine_id() -> None:
        _write_machine_id(req.machine_id)

    async def hostname() -> None:
        socket.sethostname(req.hostname)
        write_hostname_files(req.hostname)

    async def network() -> None:
        nics = interfaces()
        ifname = pick_interface(nics, req.mac, req.old_mac)
        if ifname is None:
            raise Failed(
                ErrorCode.NOT_FOUND,
                f"no interface with MAC {req.old_mac or req.mac} among {sorted(nics)}",
            )
        relink(req, ifname)
        if req.dns:
            atomic_write("/etc/resolv.conf", netconfig.resolv_conf(req.dns, []))

    for name, fn in (
        ("entropy", entropy), ("clock", clock), ("machine-id", machine_id),
        ("hostname", hostname), ("network", network),
    ):
        await _step(name, fn)
    return gp.Ok(id=req.id)
