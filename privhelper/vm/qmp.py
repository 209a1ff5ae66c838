"""QMP adapter over :mod:`qemu.qmp` with a timeout on every command.

This is the QMP boundary: qemu.qmp's exceptions are mapped here, once, to the
engine's (an error answer becomes :class:`QmpError`, a dead or absent socket
:class:`VmUnavailable`, a slow QEMU :class:`VmTimeout`).  Only qemu.qmp's
public API is used.  The client's default event listener is made to accept
nothing and a bounded one is used instead: qemu.qmp's keeps an unbounded
history and queue, and a guest can cause events.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from agentiso.protocol.errors import map_exceptions

from .errors import QmpError, VmTimeout, VmUnavailable

#: Events the engine reacts to; everything else is dropped on arrival.
WATCHED_EVENTS = (
    "SHUTDOWN", "STOP", "RESUME", "RESET", "MIGRATION", "GUEST_PANICKED", "BLOCK_IO_ERROR",
)
MAX_QUEUED_EVENTS = 64


class BoundedListener(EventListener):
    """An EventListener that keeps no history and at most MAX_QUEUED_EVENTS events.

    It keeps its own bounded queue (the base class's is unbounded and
    private), so it overrides every method that reads or writes the queue.
    ``guest_shutdown`` is set the moment a guest-initiated SHUTDOWN arrives,
    without waiting for anyone to consume the queue.
    """

    guest_shutdown = False

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names)
        self._pending: asyncio.Queue[Message] = asyncio.Queue(MAX_QUEUED_EVENTS)

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        data = event.get("data")
        if event["event"] == "SHUTDOWN" and isinstance(data, dict) and data.get("guest"):
            self.guest_shutdown = True
        with contextlib.suppress(asyncio.QueueFull):  # a flood loses events, never memory
            self._pending.put_nowait(event)

    async def get(self) -> Message:
        return await self._pending.get()

    def empty(self) -> bool:
        return self._pending.empty()

    def clear(self) -> list[Message]:
        events = []
        while not self._pending.empty():
            events.append(self._pending.get_nowait())
        return events


def _reject_all(_event: Message) -> bool:
    return False


def _qmp_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """qemu.qmp's and the socket's exceptions as the engine's, for ``what``."""
    return map_exceptions({
        TimeoutError: lambda exc: VmTimeout(f"{what} timed out"),
        ExecuteError: lambda exc: QmpError(f"{what}: {exc}"),
        (QMPError, OSError, EOFError): lambda exc: VmUnavailable(
            f"{what}: connection lost ({type(exc).__name__}: {exc})"
        ),
    })


class Qmp:
    def __init__(self, vm_name: str, default_timeout: float = 10.0) -> None:
        self.default_timeout = default_timeout
        self._client = QMPClient(f"agentiso-{vm_name}")
        # The default listener cannot be removed; make it accept nothing.
        self._client.events.event_filter = _reject_all
        self.events = BoundedListener(WATCHED_EVENTS)
        self._client.register_listener(self.events)
        #: Serialises fd passing: QEMU attaches a passed fd to the next
        #: command it reads on this connection, so the command that consumes
        #: it must follow the fd with no other command between them.
        self._fd_lock = anyio.Lock()

    async def connect(self, path: str, timeout: float | None = None) -> None:
        with (
            _qmp_errors(f"QMP at {path}: connect"),
            anyio.fail_after(timeout or self.default_timeout),
        ):
            await self._client.connect(path)

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``cmd``; returns QEMU's ``return`` value."""
        with _qmp_errors(f"QMP command {cmd}"), anyio.fail_after(timeout or self.default_timeout):
            return await self._client.execute(cmd, args)

    async def pass_fd(self, fd: int, fdname: str, timeout: float | None = None) -> None:
        """Give QEMU a copy of ``fd`` under ``fdname`` (``getfd``); our fd stays open."""
        async with self._fd_lock:
            self._send_fd(fd)
            await self.execute("getfd", {"fdname": fdname}, timeout)

    async def add_fd(
        self, fd: int, fdset_id: int, opaque: str, timeout: float | None = None
    ) -> None:
        """Add a copy of ``fd`` to fdset ``fdset_id`` (``add-fd``); our fd stays open."""
        async with self._fd_lock:
            self._send_fd(fd)
            await self.execute("add-fd", {"fdset-id": fdset_id, "opaque": opaque}, timeout)

    def _send_fd(self, fd: int) -> None:
        with _qmp_errors("passing an fd over QMP"):
            self._client.send_fd_scm(fd)

    async def wait_disconnected(self, timeout: float) -> None:
        """Wait (bounded) until the reader has seen QEMU close the connection.

        Messages are read in order, so after this every event QEMU sent
        before exiting has been delivered to :attr:`events`.
        """
        with anyio.move_on_after(timeout):
            while self._client.runstate == Runstate.RUNNING:
                await self._client.runstate_changed()

    async def close(self) -> None:
        # Never let a broken connection's teardown error escape a cleanup path.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(Exception),
        ):
            await self._client.disconnect()
