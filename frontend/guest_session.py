"""The plumbing of a guest agent session, under :class:`~.guest_client.GuestClient`:
the host side of the sync handshake, the reader that routes frames by request
id, flow of one request (:meth:`GuestSession._open`), timeouts, and what a
broken channel raises.  The request table itself is :mod:`.mux`, shared with
the helper client.  See :mod:`.guest_client` for the contract.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import msgspec

from agentiso.protocol import guest as gp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import (
    DecodeError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    UnexpectedMessage,
    VersionMismatch,
    remote_error,
)
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.guest_constants import SYNC_RETRY_S
from agentiso.protocol.guest_session import HostSync, SessionStart
from agentiso.protocol.guest_stream import GuestStreamDecoder

from .errors import ConnectionLost, Hop
from .mux import (
    TRANSPORT_ERRORS,
    Deadline,
    ErrorFactory,
    Mux,
    Pending,
    resolve_timeout,
    send_whole_frame,
    tag_of,
)

DEFAULT_TIMEOUT_S = 60.0
#: Connection-level errors kept for inspection (a flood must not grow memory).
MAX_CONNECTION_ERRORS = 16

R = TypeVar("R")

_TIMEOUT_ADVICE = "it was cancelled in the guest; pass a longer timeout if it needs more time"
_HELLO_ADVICE = (
    "the VM may still be booting, or its agent is not running: see its console"
    " (vm_console) and try again"
)


class GuestSession:
    """A session with one guest agent: the plumbing under :class:`GuestClient`
    (create one with :meth:`connect`).

    ``peer`` names the agent in error messages (e.g. "VM 'ws''s guest
    agent"); ``hop`` is the link whose end means the channel is gone."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        default_timeout: float = DEFAULT_TIMEOUT_S,
        *,
        peer: str = "the guest agent",
        hop: Hop = Hop.GUEST_AGENT,
    ) -> None:
        self._stream = stream
        self.default_timeout = resolve_timeout(default_timeout, DEFAULT_TIMEOUT_S)
        self._peer = peer
        self._hop = hop
        self._send_lock = anyio.Lock()
        self._mux: Mux[Any] = Mux()
        self._hello_event = anyio.Event()
        #: The handshake's rules (protocol.guest_session): which Hello counts.
        self._handshake = HostSync()
        self._slots: anyio.Semaphore | None = None
        #: The agent's refusal of the whole connection (version, secret),
        #: raised as itself by connect().
        self._refusal: ProtocolError | RemoteError | None = None
        #: The last connection-level errors (id 0) received from the agent.
        self.connection_errors: deque[gp.Error] = deque(maxlen=MAX_CONNECTION_ERRORS)

    @property
    def hello(self) -> gp.Hello | None:
        """The agent's Hello of the current session (None while none is)."""
        return self._handshake.hello

    @property
    def closed(self) -> bool:
        """The channel is gone: every request on it fails (open a new one)."""
        return self._mux.closed or self._refusal is not None

    @property
    def _pending(self) -> dict[int, Pending[Any]]:
        """Requests in flight by id (tests look at it)."""
        return self._mux.pending

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        stream: anyio.abc.ByteStream,
        *,
        hello_timeout: float = 30.0,
        secret: bytes | None = None,
        default_timeout: float = DEFAULT_TIMEOUT_S,
        peer: str = "the guest agent",
        hop: Hop = Hop.GUEST_AGENT,
    ) -> AsyncIterator[Self]:
        """Start the reader, (authenticate,) wait for Hello and check its version."""
        client = cls(stream, default_timeout, peer=peer, hop=hop)
        hello_s = resolve_timeout(hello_timeout, 30.0, "hello_timeout")
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            # The reader never raises (it records why it stopped in the mux),
            # so the only exception here is the caller's: keep it out of the
            # task group, so callers see it as is rather than in an ExceptionGroup.
            tg.start_soon(client._reader)
            try:
                if secret is not None:
                    await client._send(gp.Auth(id=0, secret=secret))
                await client._sync(hello_s)
                yield client
            except BaseException as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
                client._close(client._lost(hop, "the guest client was closed"))
        if error is not None:
            raise error

    async def wait_hello(self, timeout: float | None = None) -> gp.Hello:
        """The agent's Hello of the current session, waiting up to ``timeout``."""
        seconds = resolve_timeout(timeout, self.default_timeout)
        with anyio.move_on_after(seconds):
            await self._hello_event.wait()
        return self._current_hello(
            Deadline(0.0, seconds, f"the hello of {self._peer}", _HELLO_ADVICE)
        )

    def _current_hello(self, deadline: Deadline) -> gp.Hello:
        """The session's Hello, or why there is none: the connection's error,
        or RequestTimeout (``deadline`` says for what)."""
        self._raise_if_closed()
        if self.hello is None:
            raise deadline.error()
        return self.hello

    async def resync(self, timeout: float | None = 10.0) -> gp.Hello:
        """Restart the session in place (e.g. after a framing error): every
        in-flight request fails with ConnectionLost; returns the new Hello."""
        return await self._sync(resolve_timeout(timeout, self.default_timeout))

    async def _sync(self, timeout: float) -> gp.Hello:
        """Send the host sync marker with a fresh nonce and wait for the Hello
        that echoes it (earlier, unprompted Hellos are ignored)."""
        self._hello_event = anyio.Event()
        marker = self._handshake.start()
        deadline = Deadline.after(timeout, f"the sync marker sent to {self._peer}", _HELLO_ADVICE)
        # Resent until answered: the agent may be mid-frame of a vanished host
        # (it abandons such a frame after a few seconds) or still booting.
        while not self._hello_event.is_set():
            await self._send_bytes(marker)
            left = deadline.remaining()
            if left <= 0:
                break
            with anyio.move_on_after(min(SYNC_RETRY_S, left)):
                await self._hello_event.wait()
        return self._current_hello(deadline)

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the channel (tests of hostile input)."""
        await self._send_bytes(data)

    # --- the reader ------------------------------------------------------------------

    async def _reader(self) -> None:
        """Route frames until the channel ends; never raises (the end, whatever
        its cause, fails every pending and later request)."""
        peer = self._peer
        try:
            await self._read_loop()
        except TRANSPORT_ERRORS as exc:
            reason = self._channel_closed(exc)
        except (ProtocolError, RemoteError) as exc:
            if exc is self._refusal:
                reason = self._lost(Hop.GUEST_AGENT, f"{peer} refused the connection: {exc}", exc)
            else:
                reason = self._lost(
                    Hop.GUEST_AGENT,
                    f"{peer} broke the guest protocol ({exc}), so the channel was closed:"
                    " open it again; if this recurs the guest's agent is broken",
                    exc,
                )
        except Exception as exc:  # a bug here must fail the requests, not hang them
            reason = self._lost(self._hop, f"the guest client's reader failed: {exc!r}", exc)
        self._close(reason)

    async def _read_loop(self) -> None:
        decoder = GuestStreamDecoder(gp.GUEST_MAX_FRAME)
        while True:
            for item in decoder.feed(await self._stream.receive(256 * 1024)):
                if item is not None:  # None: a sync marker, a greeting follows
                    self._route(item)

    def _route(self, body: bytes) -> None:
        try:
            msg = gp.response_codec.decode(body)
        except DecodeError as exc:
            # The framing is intact, so only the request the frame names fails.
            self._mux.fail_one(peek_request_id(body), self._invalid_answer(exc))
            return
        if isinstance(msg, gp.Hello):
            self._on_hello(msg)
        elif msg.id != 0:
            self._mux.deliver(msg.id, msg, self._overflowed)
        elif isinstance(msg, gp.Error):
            self.connection_errors.append(msg)
            refusal = self._handshake.on_connection_error(msg)
            if refusal is not None:  # authentication refused
                self._refusal = refusal
                raise refusal

    def _on_hello(self, msg: gp.Hello) -> None:
        try:
            started = self._handshake.on_hello(msg)
        except VersionMismatch as exc:
            self._refusal = exc
            raise
        if started is None:
            return  # stale, or the same session greeting again: nothing is lost
        if started is SessionStart.ANSWERED:
            why = (f"the session with {self._peer} was restarted by this client (resync):"
                   " requests in flight were cancelled in the guest")
        else:
            why = (f"{self._peer} restarted (new session {msg.session}): requests in flight"
                   " were lost and may or may not have taken effect; retry them")
        # A new session: whatever was in flight will never be answered.
        self._mux.fail_all(self._lost(Hop.GUEST_AGENT, why))
        if self._slots is None:
            self._slots = anyio.Semaphore(msg.max_inflight)
        self._hello_event.set()

    def _invalid_answer(self, exc: DecodeError) -> ErrorFactory:
        return lambda: RemoteProtocolError(f"{self._peer} sent an invalid answer: {exc}")

    def _overflowed(self) -> Exception:
        return RemoteProtocolError(f"{self._peer} overflowed a stream's credit window")

    def _lost(self, hop: Hop, detail: str, cause: BaseException | None = None) -> ErrorFactory:
        return lambda: ConnectionLost(hop, detail, cause=cause)

    def _channel_closed(self, cause: BaseException) -> ErrorFactory:
        if self._hop is Hop.RELAY:
            detail = (f"the helper's relay to {self._peer} closed ({cause!r}): the VM may have"
                      " stopped or the helper restarted; check the VM and open its guest"
                      " channel again")
        else:
            detail = (f"the channel to {self._peer} closed ({cause!r}): the VM may have"
                      " stopped; connect again once it runs")
        return self._lost(self._hop, f"{detail} (requests in flight may or may not have"
                          " taken effect)", cause)

    def _close(self, reason: ErrorFactory) -> None:
        self._mux.close(reason)
        self._hello_event.set()

    def _raise_if_closed(self) -> None:
        if self._refusal is not None:
            raise self._refusal
        err = self._mux.closed_error()
        if err is not None:
            raise err

    # --- request plumbing ------------------------------------------------------------

    async def _send(self, msg: Any, deadline: Deadline | None = None) -> None:
        await self._send_bytes(
            encode_frame(gp.request_codec.encode(msg), gp.GUEST_MAX_FRAME), deadline
        )

    async def _send_bytes(self, data: bytes, deadline: Deadline | None = None) -> None:
        if deadline is None:
            await self._send_now(data)
        else:
            with deadline.limit():
                await self._send_now(data)

    async def _send_now(self, data: bytes) -> None:
        async with self._send_lock:
            closed = self._mux.closed_error()
            if closed is not None:
                raise closed
            try:
                await send_whole_frame(self._stream, data)
            except TRANSPORT_ERRORS as exc:  # TimeoutError (a stuck frame) is an OSError
                lost = self._channel_closed(exc)
                self._close(lost)
                err = self._mux.closed_error() or lost()
                raise err from err.__cause__

    @asynccontextmanager
    async def _open(
        self, msg: Any, buffer: int = 2, deadline: Deadline | None = None
    ) -> AsyncIterator[Pending[Any]]:
        """Register a request, send a copy of ``msg`` under its id, and yield
        its response stream; a request abandoned before its last message
        (error, timeout, cancellation) is cancelled in the guest."""
        closed = self._mux.closed_error()
        if closed is not None:
            raise closed
        if self._slots is None:
            raise RuntimeError("GuestClient.connect() first")
        if deadline is None:
            await self._slots.acquire()
        else:
            with deadline.limit():
                await self._slots.acquire()
        try:
            pending = self._mux.open(buffer)
            try:
                await self._send(msgspec.structs.replace(msg, id=pending.id), deadline)
                yield pending
                pending.finished = True
            finally:
                self._mux.forget(pending)
                if not pending.finished and not self._mux.closed:
                    await self._cancel_remote(pending.id)
        finally:
            self._slots.release()

    async def _next(self, pending: Pending[Any], deadline: Deadline) -> Any:
        item = await pending.receive(deadline)
        if not isinstance(item, gp.STREAM_EVENTS):
            pending.finished = True
        if isinstance(item, gp.Error):
            raise remote_error(item.code, item.message)
        return item

    async def _cancel_remote(self, rid: int) -> None:
        with anyio.move_on_after(1.0, shield=True):
            try:
                await self._send(gp.Cancel(id=self._mux.next_id(), target=rid))
            except ConnectionLost:
                pass

    def _deadline(self, msg: Any, seconds: float) -> Deadline:
        return Deadline.after(seconds, f"{tag_of(msg)} sent to {self._peer}", _TIMEOUT_ADVICE)

    async def request(self, msg: Any, expect: type[R], timeout: float | None = None) -> R:
        """Send a copy of ``msg`` under a fresh id and return its single response."""
        deadline = self._deadline(msg, resolve_timeout(timeout, self.default_timeout))
        async with self._open(msg, deadline=deadline) as pending:
            resp = await self._next(pending, deadline)
        if not isinstance(resp, expect):
            raise UnexpectedMessage(f"{expect.__name__} in answer to {tag_of(msg)}", resp)
        return resp
