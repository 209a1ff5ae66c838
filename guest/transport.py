"""Where the host comes from: the virtio-serial port, vsock, a unix socket, an fd.

virtio-serial (the path that runs on hosts without vhost-vsock), as the Linux
driver behaves:

* The guest end is ``/dev/vportNpM``; its name is in
  ``/sys/class/virtio-ports/vportNpM/name``.  There is no udev in the guest:
  devtmpfs creates the node, and if it is missing we make it from the ``dev``
  attribute.
* While no host is connected to the chardev, poll() reports POLLHUP (and
  POLLIN), read() returns 0 and write() blocks (EAGAIN when non-blocking).  So
  "read returned 0" means the host went away, not that the port is finished;
  we keep the port open and wait until POLLHUP clears.  The driver sends
  SIGIO on host connect/disconnect to an O_ASYNC owner, which wakes us at once;
  a slow poll backs it up.
* When a host is back we greet it again (sync marker + Hello, same session);
  a new host restarts the session with its own sync marker (see connection).

vsock: a listener on port ``AGENT_VSOCK_PORT``; every connection must authenticate with the
per-VM secret before it sees a Hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable

from agentiso.protocol import guest_constants as gc

from .channel import FdChannel
from .fdio import close_quietly

log = logging.getLogger("agentiso.guest.transport")

PORT_NAME = gc.AGENT_PORT_NAME
VSOCK_PORT = gc.AGENT_VSOCK_PORT
SECRET_PATH = gc.SECRET_SYSFS_PATH

ServeChannel = Callable[[FdChannel, "bytes | None"], Awaitable[None]]


def find_virtio_port(name: str = PORT_NAME, sysfs: str = "/sys/class/virtio-ports",
                     devdir: str = "/dev") -> str | None:
    """Path of the device node of the port named ``name`` (made if missing)."""
    try:
        ports = sorted(os.listdir(sysfs))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(sysfs, port, "name")) as f:
                if f.read().strip() != name:
                    continue
        except OSError:
            continue
        node = os.path.join(devdir, port)
        if os.path.exists(node):
            return node
        return _make_node(os.path.join(sysfs, port, "dev"), port)
    return None


def _make_node(dev_attr: str, port: str) -> str | None:
    try:
        with open(dev_attr) as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        os.makedirs("/run/agentiso", exist_ok=True)
        node = f"/run/agentiso/{port}"
        if not os.path.exists(node):
            os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
        return node
    except (OSError, ValueError):
        log.exception("cannot make a device node for %s", port)
        return None


async def serve_virtio_serial(serve: ServeChannel, on_listen: Callable[[], None],
                              name: str = PORT_NAME) -> None:
    """Serve the virtio port forever: one session that survives hosts coming
    and going (see :mod:`agentiso.guest.channel`)."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    with contextlib.suppress(RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGIO, woken.set)
    warned = False
    while True:
        path = find_virtio_port(name)
        if path is None:
            if not warned:
                log.warning("virtio port %s not found yet", name)
                warned = True
            await asyncio.sleep(0.2)
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot open %s: %s", path, exc)
            await asyncio.sleep(1.0)
            continue
        try:
            on_listen()
            log.info("listening on %s", path)
            channel = FdChannel(fd, "virtio-serial", virtio=True, woken=woken)
            await channel.wait_reconnect()  # greet only once a host is there
            await serve(channel, None)
            log.warning("session on %s ended; starting another", path)
        except OSError:
            log.exception("virtio port %s failed; reopening", path)
            await asyncio.sleep(0.5)
        finally:
            close_quietly(fd)


def read_secret(path: str = SECRET_PATH) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(gc.SECRET_MAX_BYTES + 1)
    except OSError:
        return None
    return data if gc.SECRET_MIN_BYTES <= len(data) <= gc.SECRET_MAX_BYTES else None


#: Connections that have not yet presented the secret, at most.  On vsock any
#: local process of the host may connect; each such connection costs a task
#: and a buffer until AUTH_TIMEOUT_S.  Past the cap the OLDEST pending one is
#: dropped, not the new one: a flood then cannot lock the helper out (its
#: connection authenticates within milliseconds of connecting).
MAX_UNAUTHENTICATED = 8
#: Authenticated sessions at once (the helper holds one per VM, plus a few
#: during a reconnect); past it new connections are closed at once.
MAX_SESSIONS = 16


class GatedChannel(FdChannel):
    """A listener's connection: tells its :class:`AuthGate` when its session
    authenticated (:meth:`~.connection.Session._authenticate` calls
    :meth:`authenticated`)."""

    def __init__(self, fd: int, name: str, gate: AuthGate, key: object) -> None:
        super().__init__(fd, name)
        self._gate, self._key = gate, key

    def authenticated(self) -> None:
        self._gate.authenticated(self._key)


class AuthGate:
    """Which connections of a listener are still unauthenticated (pure
    bookkeeping: the listener acts on what :meth:`admit` says)."""

    def __init__(self, max_pending: int = MAX_UNAUTHENTICATED,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.max_pending, self.max_sessions = max_pending, max_sessions
        #: Pending connections, oldest first, with what evicts each.
        self.pending: dict[object, Callable[[], None]] = {}
        self.sessions: set[object] = set()

    def admit(self, key: object, evict: Callable[[], None]) -> bool:
        """Take a new connection; False: refuse it (too many sessions).  When
        ``max_pending`` connections already wait, the oldest is evicted."""
        if len(self.sessions) >= self.max_sessions:
            return False
        while len(self.pending) >= self.max_pending:
            oldest = next(iter(self.pending))
            self.pending.pop(oldest)()
        self.pending[key] = evict
        return True

    def authenticated(self, key: object) -> None:
        if self.pending.pop(key, None) is not None:
            self.sessions.add(key)

    def gone(self, key: object) -> None:
        self.pending.pop(key, None)
        self.sessions.discard(key)


async def serve_listener(sock: socket.socket, name: str, serve: ServeChannel,
                         secret: bytes | None, gate: AuthGate | None = None) -> None:
    """Accept connections on ``sock`` forever; one session per connection,
    within the bounds of ``gate`` (see :data:`MAX_UNAUTHENTICATED`)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    gate = gate or AuthGate()
    tasks: set[asyncio.Task[None]] = set()
    evictions = 0
    while True:
        try:
            conn, _ = await loop.sock_accept(sock)
        except OSError as exc:
            log.warning("%s accept failed: %s", name, exc)
            await asyncio.sleep(0.5)
            continue
        fd = conn.detach()
        key = object()
        holder: list[asyncio.Task[None]] = []

        def evict(holder: list[asyncio.Task[None]] = holder) -> None:
            nonlocal evictions
            if evictions % 100 == 0:  # a flood must not flood the console too
                log.warning("%s: too many unauthenticated connections; dropping the "
                            "oldest (%d dropped so far)", name, evictions + 1)
            evictions += 1
            for task in holder:
                task.cancel()

        if not gate.admit(key, evict):
            log.warning("%s: %d sessions already; connection refused", name, gate.max_sessions)
            close_quietly(fd)
            continue
        if secret is None:  # nothing to present: a session at once
            gate.authenticated(key)

        def ended(task: asyncio.Task[None], fd: int = fd, key: object = key) -> None:
            # A done callback, not a finally: a task evicted before it first
            # ran never executes its body, and its fd must still be closed.
            tasks.discard(task)
            gate.gone(key)
            close_quietly(fd)

        async def one(channel: GatedChannel) -> None:
            await serve(channel, secret)

        task = loop.create_task(one(GatedChannel(fd, name, gate, key)))
        holder.append(task)
        tasks.add(task)
        task.add_done_callback(ended)


def vsock_device_present(sysfs: str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport"
                          ) -> bool:
    """Whether a virtio-vsock device is bound (the vsock module alone makes
    /dev/vsock even where there is no device)."""
    try:
        return any(name.startswith("virtio") for name in os.listdir(sysfs))
    except OSError:
        return False


def vsock_listener(port: int = VSOCK_PORT) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    return sock


def unix_listener(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(16)
    return sock
