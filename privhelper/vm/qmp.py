"""QMP adapter over :mod:`qemu.qmp` with a timeout on every command.

Errors are mapped to the engine's: an error answer becomes :class:`QmpError`,
a dead or absent socket :class:`VmUnavailable`, a slow QEMU :class:`VmTimeout`.
The client's default event listener is replaced by a bounded one: qemu.qmp's
keeps an unbounded history and queue, and a guest can cause events.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from .errors import QmpError, VmTimeout, VmUnavailable

#: Events the engine reacts to; everything else is dropped on arrival.
WATCHED_EVENTS = ("SHUTDOWN", "STOP", "RESUME", "RESET", "MIGRATION", "GUEST_PANICKED")
MAX_QUEUED_EVENTS = 64


class BoundedListener(EventListener):
    """An EventListener that keeps no history and at most MAX_QUEUED_EVENTS events.

    ``guest_shutdown`` is set the moment a guest-initiated SHUTDOWN arrives,
    without waiting for anyone to consume the queue.
    """

    guest_shutdown = False

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        data = event.get("data")
        if event["event"] == "SHUTDOWN" and isinstance(data, dict) and data.get("guest"):
            self.guest_shutdown = True
        if self._queue.qsize() < MAX_QUEUED_EVENTS:
            self._queue.put_nowait(event)


def _reject_all(_event: Message) -> bool:
    return False


class Qmp:
    def __init__(self, vm_name: str, default_timeout: float = 10.0) -> None:
        self.default_timeout = default_timeout
        self._client = QMPClient(f"agentiso-{vm_name}")
        # The default listener cannot be removed; make it accept nothing.
        self._client.events.event_filter = _reject_all
        self.events = BoundedListener(WATCHED_EVENTS)
        self._client.register_listener(self.events)
        self._fd_lock = anyio.Lock()

    async def connect(self, path: str, timeout: float | None = None) -> None:
        try:
            with anyio.fail_after(timeout or self.default_timeout):
                await self._client.connect(path)
        except TimeoutError:
            raise VmTimeout(f"QMP at {path} did not greet in time") from None
        except (QMPError, OSError) as e:
            raise VmUnavailable(f"cannot connect to QMP at {path}: {e}") from None

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``cmd``; returns QEMU's ``return`` value."""
        try:
            with anyio.fail_after(timeout or self.default_timeout):
                return await self._client.execute(cmd, args)
        except TimeoutError:
            raise VmTimeout(f"QMP command {cmd} timed out") from None
        except ExecuteError as e:
            raise QmpError(f"QMP {cmd}: {e}") from None
        except (QMPError, OSError, EOFError) as e:
            raise VmUnavailable(f"QMP {cmd}: connection lost ({type(e).__name__})") from None

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
        # QEMU attaches the fd to the next command read on this connection: the
        # caller holds _fd_lock so that command is the one that consumes it.
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise VmUnavailable(f"cannot pass an fd over QMP: {e}") from None

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


def fd_size(fd: int) -> int:
    return os.fstat(fd).st_size
