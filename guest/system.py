"""System handlers: ping, hostname, network, sync, freeze/thaw, env, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from . import netconfig
from .connection import RequestContext
from .errors import Failed, from_oserror
from .state import AgentState, kernel_uptime

log = logging.getLogger("agentiso.guest.system")

# <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
# <linux/reboot.h>
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC


async def handle_ping(req: gp.Ping, ctx: RequestContext) -> gp.Pong:
    return gp.Pong(id=req.id, uptime_s=kernel_uptime())


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.agentiso-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    # /etc/resolv.conf may be a dangling symlink in a fresh image: replace it.
    os.replace(tmp, path)


def write_hostname_files(hostname: str) -> None:
    atomic_write("/etc/hostname", hostname + "\n")
    try:
        with open("/etc/hosts") as f:
            hosts = f.read()
    except FileNotFoundError:
        hosts = ""
    atomic_write("/etc/hosts", netconfig.hosts_with_hostname(hosts, hostname))


def require_vm(ctx: RequestContext, what: str) -> None:
    # Outside a VM (tests, benchmarks on a developer's machine) these would
    # change the machine the agent runs on.
    if not ctx.state.pid1:
        raise Failed(ErrorCode.PERMISSION_DENIED, f"{what} is only done by the agent as PID 1")


async def handle_hostname(req: gp.SetHostname, ctx: RequestContext) -> gp.Ok:
    require_vm(ctx, "setting the hostname")
    try:
        socket.sethostname(req.hostname)
    except OSError as exc:
        raise from_oserror(exc, "sethostname") from None
    try:
        await asyncio.to_thread(write_hostname_files, req.hostname)
    except OSError as exc:
        raise from_oserror(exc, "/etc") from None
    return gp.Ok(id=req.id)


async def run_command(argv: list[str], ctx: RequestContext, stdin: bytes = b"") -> None:
    from .process import spawn

    child = spawn(argv, None, ctx.state.env_defaults, stdin, ctx.state.reaper)
    try:
        async with asyncio.timeout(30):
            status = await asyncio.shield(child.exited)
        err = os.read(child.stderr, 4096) if status else b""
    except TimeoutError:
        child.killpg()
        raise Failed(ErrorCode.TIMEOUT, f"{argv[0]} timed out") from None
    except BlockingIOError:
        err = b""
    finally:
        child.close()
    if status != 0:
        raise Failed(ErrorCode.INVALID,
                     f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")


async def run_ip(cmds: list[list[str]], ctx: RequestContext) -> None:
    """Run ``ip`` commands in one ``ip -batch -`` (see :func:`netconfig.ip_batch`)."""
    try:
        script = netconfig.ip_batch(cmds)
    except ValueError as exc:
        raise Failed(ErrorCode.INVALID, str(exc)) from None
    await run_command(["ip", "-batch", "-"], ctx, script)


async def handle_network(req: gp.ConfigureNetwork, ctx: RequestContext) -> gp.Ok:
    require_vm(ctx, "network configuration")
    ifname = req.interface
    if ifname is None:
        if req.mac is None:  # the decoder refuses this already; a request is not trusted
            raise Failed(ErrorCode.INVALID, "exactly one of mac and interface must be given")
        ifname = netconfig.find_interface_by_mac(req.mac)
        if ifname is None:
            raise Failed(ErrorCode.NOT_FOUND, f"no interface with MAC {req.mac}")
    elif not await asyncio.to_thread(os.path.exists, f"/sys/class/net/{ifname}"):
        raise Failed(ErrorCode.NOT_FOUND, f"no interface {ifname}")
    await run_ip(netconfig.ip_commands(req, ifname), ctx)
    if req.dns or req.search:
        try:
            atomic_write("/etc/resolv.conf", netconfig.resolv_conf(req.dns, req.search))
        except OSError as exc:
            raise from_oserror(exc, "/etc/resolv.conf") from None
    return gp.Ok(id=req.id)


async def handle_sync(req: gp.Sync, ctx: RequestContext) -> gp.Ok:
    await asyncio.to_thread(os.sync)
    return gp.Ok(id=req.id)


class Freezer:
    """FIFREEZE/FITHAW of one filesystem with an automatic thaw.

    The ioctls are injectable so the timer logic can be tested without freezing
    a real filesystem."""

    def __init__(
        self,
        path: str = "/",
        freeze: Callable[[int], None] | None = None,
        thaw: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self._freeze: Callable[[int], object] = freeze or (lambda fd: fcntl.ioctl(fd, FIFREEZE, 0))
        self._thaw: Callable[[int], object] = thaw or (lambda fd: fcntl.ioctl(fd, FITHAW, 0))
        self._timer: asyncio.TimerHandle | None = None
        # Orders the host's Freeze and Thaw requests: a Thaw that arrives while
        # a Freeze is still syncing (in a thread) runs after it instead of
        # finding the filesystem not yet frozen and doing nothing, and two
        # Freezes never both reach FIFREEZE (the second would get EBUSY).
        self._order = asyncio.Lock()
        self.frozen = False
        self.auto_thaws = 0

    def _on_path(self, op: Callable[[int], object]) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            op(fd)
        finally:
            os.close(fd)

    def freeze(self, auto_thaw_s: float) -> None:
        """Freeze (or, if frozen, re-arm the auto-thaw)."""
        if not self.frozen:
            self.freeze_now()
        self.arm(auto_thaw_s)

    def freeze_now(self) -> None:
        """sync + FIFREEZE; blocking (run it in a thread)."""
        if not self.frozen:
            os.sync()
            self._on_path(self._freeze)
            self.frozen = True

    def arm(self, auto_thaw_s: float) -> None:
        """(Re)start the automatic thaw timer; call in the event loop."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(auto_thaw_s, self._auto_thaw)

    def thaw(self) -> bool:
        """Thaw; False if it was not frozen."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.frozen:
            return False
        self._on_path(self._thaw)
        self.frozen = False
        return True

    async def hold(self, auto_thaw_s: float) -> None:
        """Freeze (sync and FIFREEZE in a thread, so the loop keeps serving)
        and arm the automatic thaw; if frozen already, re-arm it.  Ordered
        with :meth:`release`."""
        async with self._order:
            await asyncio.to_thread(self.freeze_now)
            self.arm(auto_thaw_s)

    async def release(self) -> bool:
        """Thaw once any Freeze that came first is done; False if not frozen."""
        async with self._order:
            return self.thaw()

    def _auto_thaw(self) -> None:
        self._timer = None
        log.warning("no thaw from the host in time: thawing %s", self.path)
        self.auto_thaws += 1
        try:
            self.thaw()
        except OSError:
            log.exception("auto-thaw failed")


async def handle_freeze(req: gp.Freeze, ctx: RequestContext) -> gp.Ok:
    require_vm(ctx, "freezing the root filesystem")
    freezer = ctx.state.freezer
    try:
        await freezer.hold(req.auto_thaw_s)
    except OSError as exc:
        raise from_oserror(exc, "FIFREEZE /") from None
    return gp.Ok(id=req.id)


async def handle_thaw(req: gp.Thaw, ctx: RequestContext) -> gp.Ok:
    try:
        await ctx.state.freezer.release()
    except OSError as exc:
        raise from_oserror(exc, "FITHAW /") from None
    return gp.Ok(id=req.id)


async def handle_set_env(req: gp.SetEnv, ctx: RequestContext) -> gp.Ok:
    env = {} if req.replace else dict(ctx.state.env_defaults)
    for key in req.unset:
        env.pop(key, None)
    env.update(req.set)
    ctx.state.env_defaults = env
    return gp.Ok(id=req.id)


def _power_off(reboot: bool) -> None:
    """As PID 1: stop everything, sync, and reboot(2).  Does not return."""
    for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.2)):
        with contextlib.suppress(OSError):
            os.kill(-1, sig)  # every process but ourselves
        time.sleep(pause)
    os.sync()
    import ctypes  # only here: its import costs boot time

    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_AUTOBOOT if reboot else RB_POWER_OFF)
    log.error("reboot(2) failed: errno %d", ctypes.get_errno())


async def handle_shutdown(req: gp.Shutdown, ctx: RequestContext) -> None:
    state = ctx.state
    # Answer first: after reboot(2) there is nobody to answer.
    await ctx.send(gp.Ok(id=req.id))
    # Not in this request's task: the host may hang up on the Ok, which
    # cancels the session's requests, and the shutdown must still happen.
    state.keep(asyncio.get_running_loop().create_task(_shut_down(state, req.reboot)))


async def _shut_down(state: AgentState, reboot: bool) -> None:
    if state.freezer.frozen:
        with contextlib.suppress(OSError):
            state.freezer.thaw()
    state.jobs.shutdown()
    if state.pid1:
        await asyncio.sleep(0.05)  # let the Ok leave
        await asyncio.to_thread(_power_off, reboot)
    else:
        state.exit_requested = True
        if state.on_exit is not None:
            state.on_exit()
