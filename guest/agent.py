"""The agent process: transports, sessions, and staying alive as PID 1.

As PID 1 (started by /sbin/agentiso-init) the agent must never exit (the
kernel would panic): every transport runs under a supervisor that logs and
restarts it, and the whole event loop is restarted if it ever ends.  Logs go
to stderr, which init points at the console (ttyS0).

Outside a VM (tests, benchmarks) the same code serves a unix socket
(``--unix``) or an inherited socket fd (``--fd``), reaping only its own children.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .channel import Channel
from .connection import Session, load_auth
from .handlers import HANDLERS
from .reaper import Reaper
from .state import AgentState, kernel_uptime
from .transport import (
    PORT_NAME,
    read_secret,
    serve_listener,
    serve_virtio_serial,
    unix_listener,
    vsock_device_present,
    vsock_listener,
)

log = logging.getLogger("agentiso.guest")


class Agent:
    """Agent state plus the means to serve sessions on channels."""

    def __init__(self, pid1: bool | None = None, max_inflight: int = 64) -> None:
        if pid1 is None:
            pid1 = os.getpid() == 1
        self.state = AgentState(reaper=Reaper(reap_all=pid1), pid1=pid1,
                                max_inflight=max_inflight)
        self.stopped = asyncio.Event()
        self.state.on_exit = self.stopped.set

    def start(self) -> None:
        self.state.reaper.start()

    def mark_listening(self) -> None:
        if self.state.listen is None:
            self.state.listen = kernel_uptime()

    async def serve(self, channel: Channel, secret: bytes | None = None) -> None:
        """Serve one host session on ``channel`` until it ends."""
        await Session(channel, self.state, HANDLERS, secret).run()

    def close(self) -> None:
        self.state.jobs.shutdown()
        self.state.reaper.stop()


async def _supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run ``run`` forever: a transport that fails is logged and restarted."""
    while True:
        try:
            await run()
            log.warning("%s ended; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; restarting", name)
        await asyncio.sleep(1.0)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def _load_vsock_secret() -> bytes | None:
    secret = read_secret()
    if secret is None:
        # fw_cfg's sysfs files need their module; no udev loads it for us.
        subprocess.run(["modprobe", "-q", "qemu_fw_cfg"], check=False, timeout=10,
                       stdin=subprocess.DEVNULL)
        secret = read_secret()
    return secret


async def amain(args: Args) -> int:
    agent = Agent()
    agent.start()
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    try:
        if args.fd is not None:
            from .channel import FdChannel

            fd: int = args.fd

            async def serve_fd() -> None:
                agent.mark_listening()
                await agent.serve(FdChannel(fd, "socketpair", resyncable=True))
                agent.stopped.set()  # a socketpair cannot come back

            tasks.append(loop.create_task(serve_fd()))
        if args.unix:
            secret = _read_file(args.secret_file) if args.secret_file else None
            sock = unix_listener(args.unix)
            agent.mark_listening()
            tasks.append(loop.create_task(serve_listener(sock, "unix", agent.serve, secret)))
        virtio = args.virtio_serial or (args.fd is None and not args.unix)
        if virtio:
            tasks.append(loop.create_task(_supervise("virtio-serial", lambda: serve_virtio_serial(
                agent.serve, agent.mark_listening, args.port_name))))
            if not args.no_vsock and await asyncio.to_thread(vsock_device_present):
                secret = await asyncio.to_thread(_load_vsock_secret)
                if secret is None:
                    log.warning("a vsock device but no secret in fw_cfg: vsock disabled")
                else:
                    load_auth()

                    async def vsock() -> None:
                        await serve_listener(vsock_listener(), "vsock", agent.serve, secret)
                    tasks.append(loop.create_task(_supervise("vsock", vsock)))
        log.info("agent up (pid %d, uptime %.3f s)", os.getpid(), kernel_uptime())
        await agent.stopped.wait()
        return 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        agent.close()


@dataclass
class Args:
    virtio_serial: bool = False
    port_name: str = PORT_NAME
    no_vsock: bool = False
    unix: str | None = None
    secret_file: str | None = None
    fd: int | None = None
    verbose: bool = False


def parse_args(argv: list[str] | None) -> Args:
    if argv is None:
        argv = sys.argv[1:]
    if not argv:
        return Args()  # as PID 1: no argparse import on the boot path
    import argparse

    p = argparse.ArgumentParser(prog="agentiso-guest", description=__doc__)
    p.add_argument("--virtio-serial", action="store_true",
                   help="serve the virtio-serial port (the default without --unix/--fd)")
    p.add_argument("--port-name", default=PORT_NAME)
    p.add_argument("--no-vsock", action="store_true", help="never listen on vsock")
    p.add_argument("--unix", metavar="PATH", help="serve a unix socket (tests, benchmarks)")
    p.add_argument("--secret-file", metavar="PATH", help="demand this secret on --unix")
    p.add_argument("--fd", type=int, metavar="N", help="serve an inherited socket fd")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv, namespace=Args())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
        format="agentiso-guest: %(levelname)s %(name)s: %(message)s",
    )
    if os.getpid() != 1:
        return asyncio.run(amain(args))
    # PID 1: the kernel ignores signals we do not handle, except that Python
    # turns SIGINT into KeyboardInterrupt; a console ^C must not kill init.
    # A no-op handler rather than SIG_IGN: handlers reset to the default at
    # exec, so commands we start still get SIGINT's normal meaning.
    signal.signal(signal.SIGINT, lambda _sig, _frame: None)
    while True:
        try:
            asyncio.run(amain(args))
            log.error("agent loop returned; restarting")
        except BaseException:  # PID 1 must survive anything
            log.exception("agent loop crashed; restarting")
        time.sleep(1.0)
