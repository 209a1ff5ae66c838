"""Keep an async context manager open across calls, reopening it on demand.

The MCP server holds one connection to the helper and one guest channel per
running workspace for its whole life, rather than paying a connect, hello and
sync handshake on every tool call.  Those clients are async context managers
that run a reader task, so they must be entered and exited by one task: a
:class:`KeptOpen` enters the manager in a task of the server's task group and
keeps it open until :meth:`KeptOpen.invalidate` or :meth:`KeptOpen.close`.

* A failure to open is raised to the caller of :meth:`get` (and nothing is kept).
* A failure while closing is logged and swallowed: it must never take the
  server's task group down.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

import anyio
import anyio.abc
import structlog

log = structlog.get_logger("agentiso.frontend.keepopen")

T = TypeVar("T")


class KeptOpen(Generic[T]):
    """The value of ``opener()``'s context manager, opened on first use."""

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        opener: Callable[[], AbstractAsyncContextManager[T]],
        label: str,
        *,
        is_closed: Callable[[T], bool] | None = None,
    ) -> None:
        self._tg = tg
        #: Tells a value whose connection is gone (reopened at the next get).
        self._is_closed = is_closed
        self._opener = opener
        self._label = label
        #: Serializes opening, so concurrent first calls share one connection.
        self._lock = anyio.Lock()
        self._value: T | None = None
        self._close: anyio.Event | None = None

    async def get(self) -> T:
        """The open value; opens it (in the task group) if there is none, or
        if the kept one reports its connection gone."""
        if self._value is not None and not self._stale(self._value):
            return self._value
        async with self._lock:
            if self._value is not None and self._stale(self._value):
                self.close()
            if self._value is None:
                close = anyio.Event()
                self._value = await self._tg.start(self._hold, close)
                self._close = close
            return self._value

    def _stale(self, value: T) -> bool:
        return self._is_closed is not None and self._is_closed(value)

    def invalidate(self, value: object) -> None:
        """Drop ``value`` if it is still the kept one (it broke); the next
        :meth:`get` opens a new one.  A stale ``value`` is ignored, so two
        callers that saw the same failure do not close a fresh connection."""
        if value is self._value:
            self.close()

    def close(self) -> None:
        if self._close is not None:
            self._close.set()
        self._value = None
        self._close = None

    async def _hold(self, close: anyio.Event, *, task_status: anyio.abc.TaskStatus[T]) -> None:
        started = False
        value: T | None = None
        try:
            async with self._opener() as value:
                task_status.started(value)  # an error before this goes to get()'s caller
                started = True
                await close.wait()
        except Exception as exc:
            if not started:
                raise
            # A broken connection may fail its own close: never the server's problem.
            log.info("close_failed", what=self._label, error=str(exc))
        finally:
            if started and self._value is value:
                self._value = None
