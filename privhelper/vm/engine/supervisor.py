"""One VM's supervisor: it owns everything the engine holds of one QEMU.

That is: the process (a pidfd, watched so a death is seen at once even for an
adopted QEMU that is not our child), the one QMP connection (QEMU's QMP socket
takes one client) with its event pump, the serial console pump into a bounded
log, the stderr file cap, and the VM's state.

Every state change goes through :meth:`VmSupervisor.transition`, along the
edges of :data:`~.types.TRANSITIONS` (the model is qemu.qmp's ``Runstate``);
operations that need a state check it with :meth:`VmSupervisor.require`.
Every QMP command, the engine's and the snapshot code's alike, goes through
:meth:`VmSupervisor.execute` / :meth:`pass_fd` / :meth:`add_fd`, which
reconnect a lost connection on the next call.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import SocketStream, TaskGroup, TaskStatus

from ...transport import peer_gone_is_eof
from ..boundedlog import BoundedLog, cap_appended_file, tail
from ..errors import LaunchError, VmStateConflict, VmTimeout, VmUnavailable
from ..qmp import Qmp
from ..record import VmRecord
from .types import (
    FINISHED,
    EngineSettings,
    VmEvent,
    VmState,
    VmStatus,
    io_error_reason,
    may_transition,
)

log = structlog.get_logger("agentiso.helper.vm")

#: Migration states after which nothing more happens.
MIGRATION_DONE = ("completed", "failed", "cancelled")

_T = TypeVar("_T")


class VmSupervisor:
    """The engine's view and control of one QEMU process (fresh or adopted)."""

    def __init__(
        self,
        record: VmRecord,
        settings: EngineSettings,
        *,
        adopted: bool,
        popen: subprocess.Popen[bytes] | None,
        pidfd: int,
        publish: Callable[[VmEvent], None],
    ) -> None:
        self.record = record
        self.adopted = adopted
        self._settings = settings
        self._popen = popen
        self._pidfd = pidfd
        self._publish = publish
        self._state = VmState.STARTING
        #: Set when QEMU has ended and the end is classified (state final).
        self.exited = anyio.Event()
        self.exit_reason: str | None = None
        #: The last stop step tried (named in the exit reason).
        self.stop_method: str | None = None
        self._stop_requested = False
        self._guest_shutdown = False
        self._qmp: Qmp | None = None
        #: One QMP (re)connect at a time: QEMU's QMP socket serves one client,
        #: and ``_qmp`` must not be replaced under a connect in progress.
        self._qmp_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self._tasks_done: anyio.Event | None = None
        self._events_scope: anyio.CancelScope | None = None
        self._console: BoundedLog | None = None
        self._console_eof = anyio.Event()
        self._migration: str | None = None
        self._migration_changed = anyio.Event()
        #: Why QEMU paused the VM on a disk error (see ``io_error_reason``).
        self.io_error: str | None = None

    @property
    def name(self) -> str:
        return self.record.name

    # --- state -------------------------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    def transition(self, new: VmState, *, only_from: Collection[VmState] | None = None) -> bool:
        """Move to ``new``: the one place the state changes.

        With ``only_from``, a VM in another state stays as it is and False is
        returned (an event that no longer applies, e.g. QEMU's STOP while we
        stop it).  A move the state machine forbids is a bug: VmStateConflict.
        """
        old = self._state
        if only_from is not None and old not in only_from:
            return False
        if not may_transition(old, new):
            raise VmStateConflict(f"VM {self.name}: {old} cannot become {new}")
        if old != new:
            self._state = new
            log.debug("vm_state", vm=self.name, old=str(old), new=str(new))
        return True

    def require(self, *states: VmState, to: str) -> None:
        """Guard an operation: the VM must be in one of ``states`` (and not ended)."""
        if self._state not in states or self.exited.is_set():
            raise VmStateConflict(f"VM {self.name} is {self._state}: cannot {to}")

    def require_alive(self, to: str) -> None:
        self.require(*(s for s in VmState if s not in FINISHED), to=to)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def status(self) -> VmStatus:
        finished = self._state in FINISHED
        return VmStatus(
            name=self.name,
            state=self._state,
            pid=self.record.pid,
            uid=self.record.uid,
            started_at=self.record.started_at,
            adopted=self.adopted,
            channel_socket=self.record.channel_socket,
            exit_reason=self.exit_reason,
            console_tail=self.console_tail_text() if finished else None,
            io_error=None if finished else self.io_error,
        )

    def console_tail_text(self) -> str:
        data = tail(Path(self.record.console_log), self._settings.console_tail_bytes)
        return data.decode(errors="replace")

    def mark_dead(self, reason: str) -> None:
        """A recorded QEMU found dead (adoption): final at once, nothing to watch."""
        self.transition(VmState.CRASHED)
        self.exit_reason = reason
        self.exited.set()

    # --- attaching and detaching -------------------------------------------------------

    async def attach(self, engine_tg: TaskGroup, timeout: float) -> None:
        """Start watching QEMU and connect its console and QMP (retrying while
        QEMU creates them); the watcher and pumps run in ``engine_tg``."""
        self._console = BoundedLog(Path(self.record.console_log), self._settings.console_max_bytes)
        self._tg = await engine_tg.start(self._supervise)
        deadline = anyio.current_time() + timeout
        console: SocketStream | None = None
        try:
            while True:
                if self.exited.is_set():
                    raise LaunchError(f"QEMU exited ({self.exit_reason})")
                try:
                    if console is None:
                        console = await anyio.connect_unix(self.record.console_socket)
                    qmp = Qmp(self.name, self._settings.qmp_timeout_s)
                    await qmp.connect(
                        self.record.qmp_socket,
                        timeout=max(0.1, deadline - anyio.current_time()),
                    )
                    break
                except (OSError, VmUnavailable):
                    if anyio.current_time() > deadline:
                        raise VmTimeout("QEMU's QMP socket did not come up in time") from None
                    await anyio.sleep(0.02)
        except BaseException:
            if console is not None:
                await console.aclose()
            raise
        self._tg.start_soon(self._pump_console, console)
        await self._use_qmp(qmp)

    def follow_console(self) -> None:
        """Read the console even though attaching QMP failed (an adopted VM
        whose QMP socket another client holds)."""
        if self._tg is not None:
            self._tg.start_soon(self._pump_console, None)

    async def _supervise(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        done = self._tasks_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                task_status.started(tg)
        finally:
            done.set()

    async def detach(self, *, from_watcher: bool = False) -> None:
        """Stop watching (QEMU keeps running) and release what we hold."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            self._tg = None
            if not from_watcher and self._tasks_done is not None:
                # The watcher must be off the pidfd before the fd is closed.
                with anyio.move_on_after(5):
                    await self._tasks_done.wait()
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    # --- watching ----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Wait for QEMU's end (pidfd), capping its stderr file meanwhile."""
        stderr = Path(self.record.stderr_log)
        while True:
            with anyio.move_on_after(2.0):
                await anyio.wait_readable(self._pidfd)
                break
            cap_appended_file(stderr, self._settings.stderr_max_bytes)
        rc: int | None = None
        if self._popen is not None:
            # The pidfd is readable: the child has exited, so this reaps at once.
            rc = self._popen.poll()
        # Give the console reader a moment to drain QEMU's last words, and the
        # QMP reader to deliver its last events (a guest-initiated SHUTDOWN).
        with anyio.move_on_after(0.5):
            await self._console_eof.wait()
        if self._qmp is not None:
            await self._qmp.wait_disconnected(0.5)
            self._guest_shutdown |= self._qmp.events.guest_shutdown
        reason = exit_reason(rc, self.stop_method if self._stop_requested else None)
        clean = self._stop_requested or self._guest_shutdown or (rc == 0)
        self.transition(VmState.STOPPED if clean else VmState.CRASHED)
        self.exit_reason = reason
        cap_appended_file(stderr, self._settings.stderr_max_bytes)
        log.info("vm_ended", vm=self.name, state=str(self._state), reason=reason)
        self.exited.set()
        self._publish(VmEvent(self.name, self._state, reason, self.console_tail_text()))
        with anyio.CancelScope(shield=True):
            await self.detach(from_watcher=True)

    async def _pump_console(self, stream: SocketStream | None) -> None:
        """Copy the serial console socket into the bounded log; reconnect if it drops."""
        while not self.exited.is_set():
            if stream is None:
                try:
                    stream = await anyio.connect_unix(self.record.console_socket)
                except OSError:
                    await anyio.sleep(0.2)
                    continue
                self._console_eof = anyio.Event()
            with peer_gone_is_eof():
                async with stream:
                    async for chunk in stream:
                        if self._console is not None:
                            self._console.write(chunk)
            stream = None
            self._console_eof.set()
            await anyio.sleep(0.1)

    async def _pump_events(self, qmp: Qmp, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            async for ev in qmp.events:
                self._on_event(str(ev["event"]), ev.get("data"))

    def _on_event(self, kind: str, data: object) -> None:
        if kind == "SHUTDOWN" and isinstance(data, dict) and data.get("guest"):
            self._guest_shutdown = True
        elif kind == "STOP":
            self.transition(VmState.PAUSED, only_from=(VmState.RUNNING,))
        elif kind == "RESUME":
            self.io_error = None
            self.transition(VmState.RUNNING, only_from=(VmState.PAUSED,))
        elif kind == "BLOCK_IO_ERROR":
            reason = io_error_reason(data)
            if reason is not None:
                if self.io_error is None:
                    log.warning("vm_paused_on_io_error", vm=self.name, reason=reason)
                self.io_error = reason
        elif kind == "MIGRATION" and isinstance(data, dict):
            self._migration = str(data.get("status"))
            self._migration_changed.set()
            self._migration_changed = anyio.Event()

    # --- stopping ----------------------------------------------------------------------

    def begin_stop(self, method: str) -> None:
        """We end QEMU on purpose: its end will be STOPPED, named after ``method``."""
        self._stop_requested = True
        self.stop_method = method

    def signal(self, sig: int) -> None:
        if self._pidfd < 0:
            return
        # pidfd_send_signal cannot hit a recycled pid.
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    # --- QMP -----------------------------------------------------------------------------

    async def _connected_qmp(self) -> Qmp:
        """The VM's QMP connection, reconnecting if it was lost while QEMU lives."""
        async with self._qmp_lock:
            if self._qmp is not None:
                return self._qmp
            if self.exited.is_set() or self._tg is None:
                raise VmUnavailable(f"VM {self.name} has no QMP connection")
            qmp = Qmp(self.name, self._settings.qmp_timeout_s)
            await qmp.connect(self.record.qmp_socket)
            await self._use_qmp(qmp)
            log.info("vm_qmp_reconnected", vm=self.name)
            return qmp

    async def _use_qmp(self, qmp: Qmp) -> None:
        if self._tg is None:
            await qmp.close()
            raise VmUnavailable(f"VM {self.name} is no longer watched")
        if self._events_scope is not None:
            self._events_scope.cancel()
        self._qmp = qmp
        self._events_scope = await self._tg.start(self._pump_events, qmp)

    async def _on_qmp(self, call: Callable[[Qmp], Awaitable[_T]]) -> _T:
        """Run ``call`` on the (re)connected QMP; a lost connection is dropped so
        the next call reconnects.  The failed call is not retried: it may have
        run (``migrate``, ``quit``)."""
        qmp = await self._connected_qmp()
        try:
            return await call(qmp)
        except VmUnavailable:
            if self._qmp is qmp:
                self._qmp = None
                await qmp.close()
            raise

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        return await self._on_qmp(lambda qmp: qmp.execute(cmd, args, timeout))

    async def pass_fd(self, fd: int, fdname: str) -> None:
        await self._on_qmp(lambda qmp: qmp.pass_fd(fd, fdname))

    async def add_fd(self, fd: int, fdset_id: int, opaque: str) -> None:
        await self._on_qmp(lambda qmp: qmp.add_fd(fd, fdset_id, opaque))

    # --- migration -----------------------------------------------------------------------

    def expect_migration(self) -> None:
        """Forget the last migration's outcome: call before starting one."""
        self._migration = None

    async def wait_migration(self, timeout: float) -> str:
        """Wait for QEMU's MIGRATION event saying the migration is over;
        returns its status (completed, failed, cancelled).

        QEMU sends the events once the ``events`` migration capability is on.
        If none came in time (one may be lost to a QMP reconnect), QEMU is
        asked once with ``query-migrate``; still not over is VmTimeout.
        """
        with anyio.move_on_after(timeout):
            while self._migration not in MIGRATION_DONE:
                await self._migration_changed.wait()
            return str(self._migration)
        info = await self.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status in MIGRATION_DONE:
            return str(status)
        raise VmTimeout(f"VM {self.name}: the migration did not end within {timeout:.0f} s")


def exit_reason(rc: int | None, stop_method: str | None) -> str:
    """How QEMU ended, for humans: its status (None: not our child) and what we did."""
    if rc is None:
        reason = "QEMU exited"
    elif rc < 0:
        reason = f"QEMU killed by signal {-rc} ({signal_name(-rc)})"
    else:
        reason = f"QEMU exited with status {rc}"
    return f"{reason} after {stop_method}" if stop_method else reason


def signal_name(signum: int) -> str:
    """A signal's name; real-time signals (which ``signal.Signals`` lacks and
    would raise ValueError for, taking the watcher down) are ``SIGRTMIN+k``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        rtmin, rtmax = signal.SIGRTMIN, signal.SIGRTMAX
        if rtmin <= signum <= rtmax:
            return f"SIGRTMIN+{signum - rtmin}"
        return f"signal {signum}"
