"""Where relayed answers go: the bounded queue toward one relayed client
(:class:`ClientSink`), and the one-answer slot of a helper-internal call
(:class:`CallSink`), and what one relayed client may cost (:class:`RelayLimits`).
Used by :mod:`.relay`; no I/O beyond an in-memory stream.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import anyio

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.guest_constants import GUEST_MAX_FRAME

from .errors import HelperError, RequestFailed
from .limits import CONNECTION_FLOOR, BufferBudget, unlimited_budget

#: Responses after which more frames of the same request follow.
INTERMEDIATE: tuple[type[Any], ...] = (gp.ExecOutput, gp.DownloadChunk, gp.UploadAck)
#: Most bytes queued for one client before it is judged stuck and disconnected:
#: two full credit windows (a reading client never comes near it).
CLIENT_QUEUE_BYTES = 2 * gp.MAX_WINDOW_BYTES
#: What one queued item costs beyond its bytes (the bytes object, the tuple,
#: the stream's deque slot), counted so that a flood of tiny frames (a
#: greeting per sync marker) cannot hold much more than the cap says.
ITEM_OVERHEAD = 128
#: Requests of one relayed client in flight at once; more are refused.
MAX_INFLIGHT_PER_CLIENT = 64
#: Requests of all relayed clients of one VM in flight at once (the helper's
#: own calls are not counted: a client flood must not block a freeze).
MAX_INFLIGHT_PER_CHANNEL = 256


@dataclass(frozen=True)
class RelayLimits:
    """What one relayed client may cost (the server fills it from its config)."""

    #: Bytes queued toward the client before it is dropped as not reading.
    queue_bytes: int = CLIENT_QUEUE_BYTES
    #: Its requests in flight at once.
    max_inflight: int = MAX_INFLIGHT_PER_CLIENT
    #: Requests of all relayed clients of the VM in flight at once.
    max_inflight_per_vm: int = MAX_INFLIGHT_PER_CHANNEL


class Sink:
    """Where the responses of one client's requests go."""

    def deliver(self, msg: Any) -> None:
        """A message from the guest, already relabelled with the client's id."""
        raise NotImplementedError

    def fail(self, client_id: int, code: ErrorCode, message: str) -> None:
        """The relay itself (not the guest) gives up on request ``client_id``."""
        self.deliver(gp.Error(id=client_id, code=code, message=message))

    def forget(self, client_id: int) -> None:
        """The request ``client_id`` is finished."""


class ClientSink(Sink):
    """Outbound queue of one relayed client connection, bounded in bytes.

    Everything toward the client passes the same cap (frames, and the raw
    sync marker + Hello of each greeting): at most ``limit`` bytes queued,
    each byte also taken from the helper-wide :class:`BufferBudget` for
    ``uid``.  A client that lets either fill up (it is not reading) is
    dropped: :attr:`drop_reason` says why, a last ``limit_exceeded`` error
    carrying it is queued (outside the cap: one small frame) for a client
    that reads late, :attr:`dropped` is set and nothing more is queued.
    """

    def __init__(
        self, limit: int = CLIENT_QUEUE_BYTES, budget: BufferBudget | None = None, uid: int = 0
    ) -> None:
        # Items: (bytes, counted against the cap and budget).
        self._send, self._recv = anyio.create_memory_object_stream[tuple[bytes, bool]](math.inf)
        self._queued = 0
        self._input = 0  # bytes of the client's partial frames, held by the decoder
        self._limit = limit
        self._budget = budget if budget is not None else unlimited_budget()
        self._uid = uid
        self.drop_reason: str | None = None
        self.dropped = anyio.Event()
        #: client request id -> upstream id, while the request is in flight.
        self.upstream: dict[int, int] = {}

    @property
    def queued(self) -> int:
        """Bytes queued (and held in the budget) now."""
        return self._queued

    def deliver(self, msg: Any) -> None:
        if self.drop_reason is None:
            self._queue(encode_frame(gp.response_codec.encode(msg), GUEST_MAX_FRAME))

    def deliver_raw(self, data: bytes) -> None:
        """Queue bytes already encoded (a sync marker and its Hello), under the same cap."""
        if self.drop_reason is None:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        n = len(data) + ITEM_OVERHEAD
        if self._queued + n > self._limit:
            self.drop(
                f"the client is not reading: {self._queued + n} bytes would be queued "
                f"for it, the limit is {self._limit}"
            )
            return
        why = self._budget.take(self._uid, n, self._queued + n > CONNECTION_FLOOR)
        if why is not None:
            self.drop(why)
            return
        try:
            self._send.send_nowait((data, True))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._budget.give_back(self._uid, n)  # the client is gone
            return
        self._queued += n

    def drop(self, reason: str) -> None:
        """Stop queueing for this client: it is to be disconnected for ``reason``."""
        if self.drop_reason is not None:
            return
        self.drop_reason = reason
        last = gp.Error(id=0, code=ErrorCode.LIMIT_EXCEEDED,
                        message=f"the helper drops this connection: {reason}"[:4000])
        frame = encode_frame(gp.response_codec.encode(last), GUEST_MAX_FRAME)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait((frame, False))
        self._send.close()
        self.dropped.set()

    def hold_input(self, n: int) -> bool:
        """Take ``n`` bytes of the client's input (held until decoded) from
        the budget; False (and the client dropped) if they do not fit."""
        why = self._budget.take(self._uid, n, self._input + n > CONNECTION_FLOOR)
        if why is not None:
            self.drop(why)
            return False
        self._input += n
        return True

    def release_input(self, n: int) -> None:
        """``n`` bytes of input were decoded (and are no longer held here)."""
        n = min(n, self._input)
        self._input -= n
        self._budget.give_back(self._uid, n)

    def forget(self, client_id: int) -> None:
        self.upstream.pop(client_id, None)

    async def next_frame(self) -> bytes | None:
        """The next queued frame; None once the queue is closed and drained."""
        try:
            data, counted = await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None
        if counted:
            self._unqueue(len(data) + ITEM_OVERHEAD)
        return data

    def _unqueue(self, n: int) -> None:
        self._queued -= n
        self._budget.give_back(self._uid, n)

    def close(self) -> None:
        """No more frames: the sender drains what is queued, then sees the end."""
        self._send.close()

    def release(self) -> None:
        """Give back what is still queued (the client is gone, nobody will send it)."""
        self._send.close()
        while True:
            try:
                data, counted = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if counted:
                self._unqueue(len(data) + ITEM_OVERHEAD)
        self._recv.close()
        self.release_input(self._input)


class CallSink(Sink):
    """Collects the single response of a helper-internal request."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: Any = None
        #: Set instead of ``response`` when the relay (not the guest) gave up.
        self.error: HelperError | None = None

    def deliver(self, msg: Any) -> None:
        if not isinstance(msg, INTERMEDIATE) and not self.done.is_set():
            self.response = msg
            self.done.set()

    def fail(self, client_id: int, code: ErrorCode, message: str) -> None:
        if not self.done.is_set():
            self.error = RequestFailed(code, message)
            self.done.set()
