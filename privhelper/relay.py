"""Guest relay: one channel to each VM's agent, shared by all its clients.

Each VM has one :class:`GuestChannel`.  It keeps a connection to the agent
(the VM's virtio-serial chardev socket, reconnecting when it drops), and
routes by request id:

* a client's request gets a fresh *upstream* id on the channel; responses and
  stream events coming back are re-labelled with the client's own id and
  queued to that client only;
* continuations (transfer acks, upload chunks) and ``Cancel.target`` are
  translated through the same table;
* the helper itself uses the channel too (:meth:`GuestChannel.call`) to
  freeze/thaw around snapshots, configure the network, shut the guest down.

Guarantees:

* A slow client never blocks the others: each has a bounded outbound queue;
  a client that lets it overflow is disconnected (its requests' credit windows
  already bound what a well-behaved client can have queued).
* Every frame is decoded with the guest protocol's bounded types in both
  directions; a guest that sends garbage or oversize frames loses its channel
  (which is then re-established) and never crashes the helper.
* If the channel drops (agent restart, VM resumed from a memory snapshot),
  requests in flight fail with ``unavailable``, except idempotent ones, which
  are sent again once after the reconnect.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ByteStream

from agentiso.protocol import guest as gp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import (
    DecodeError,
    ErrorCode,
    ExceptionMap,
    RemoteProtocolError,
    VersionMismatch,
    map_exceptions,
)
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.guest_constants import GUEST_MAX_FRAME, SYNC_RETRY_S
from agentiso.protocol.guest_session import AgentSync, HostSync, greeting
from agentiso.protocol.guest_stream import GuestStreamDecoder, HostMarker, HostStreamDecoder

from .errors import GuestStepFailed, HelperError, RequestFailed
from .transport import STREAM_GONE, PeerGone, peer_gone, peer_gone_is_eof, receive_some

log = structlog.get_logger("agentiso.helper.relay")

#: Responses after which more frames of the same request follow.
INTERMEDIATE: tuple[type[Any], ...] = (gp.ExecOutput, gp.DownloadChunk, gp.UploadAck)
#: Requests that may be sent again after a channel drop without changing anything.
IDEMPOTENT: tuple[type[Any], ...] = (
    gp.Ping,
    gp.FileRead,
    gp.FileStat,
    gp.ListDir,
    gp.JobPoll,
    gp.JobList,
    gp.Sync,
)
#: Most bytes queued for one client before it is judged stuck and disconnected.
CLIENT_QUEUE_BYTES = 64 * 1024 * 1024
#: How much unframed noise may precede the agent's sync marker.
MAX_SYNC_SCAN = 1024 * 1024
HELLO_TIMEOUT_S = 30.0
RECONNECT_RETRY_WINDOW_S = 15.0

Connector = Callable[[], Awaitable[ByteStream]]


class GuestChannelBroken(HelperError):
    """The connection to the agent broke (it is re-established by :meth:`GuestChannel.run`)."""

    code = ErrorCode.UNAVAILABLE


#: How the channel's session can break: the boundary maps each to GuestChannelBroken.
_CHANNEL_BROKEN: ExceptionMap = {
    RemoteProtocolError: lambda exc: GuestChannelBroken(f"the guest broke the protocol: {exc}"),
    TimeoutError: lambda exc: GuestChannelBroken("the guest agent did not greet in time"),
    # A write failing under us (PeerGone, or RequestFailed: no stream).
    (*STREAM_GONE, PeerGone, RequestFailed): lambda exc: GuestChannelBroken(
        f"{type(exc).__name__}: {exc}"
    ),
}


class _Sink:
    """Where the responses of one client's requests go."""

    def deliver(self, msg: Any) -> None:
        """A message from the guest, already relabelled with the client's id."""
        raise NotImplementedError

    def fail(self, client_id: int, code: ErrorCode, message: str) -> None:
        """The relay itself (not the guest) gives up on request ``client_id``."""
        self.deliver(gp.Error(id=client_id, code=code, message=message))

    def forget(self, client_id: int) -> None:
        """The request ``client_id`` is finished."""


@dataclass
class _Route:
    sink: _Sink
    client_id: int
    request: Any
    retried: bool = False


class ClientSink(_Sink):
    """Outbound queue of one relayed client connection (bounded in bytes)."""

    def __init__(self, limit: int = CLIENT_QUEUE_BYTES) -> None:
        self._send, self._recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._queued = 0
        self._limit = limit
        self.overflowed = False
        #: client request id -> upstream id, while the request is in flight.
        self.upstream: dict[int, int] = {}

    def deliver(self, msg: Any) -> None:
        if self.overflowed:
            return
        frame = encode_frame(gp.response_codec.encode(msg), GUEST_MAX_FRAME)
        if self._queued + len(frame) > self._limit:
            self.overflowed = True
            self._send.close()
            return
        self._queue(frame)

    def deliver_raw(self, data: bytes) -> None:
        """Queue bytes already encoded (a sync marker and its Hello)."""
        if not self.overflowed:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        self._queued += len(data)
        with peer_gone_is_eof():  # the queue is closed once the client is gone
            self._send.send_nowait(data)

    def forget(self, client_id: int) -> None:
        self.upstream.pop(client_id, None)

    async def next_frame(self) -> bytes | None:
        """The next queued frame; None once the queue is closed and drained."""
        frame: bytes | None = None
        with peer_gone_is_eof():
            frame = await self._recv.receive()
        if frame is not None:
            self._queued -= len(frame)
        return frame

    def close(self) -> None:
        self._send.close()


class _CallSink(_Sink):
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


@dataclass
class GuestChannel:
    """The helper's connection to one VM's agent.  Run :meth:`run` in a task."""

    name: str
    connect: Connector
    #: vsock only: the per-VM secret the agent demands first (any local
    #: process could connect to a guest over vsock; see docs/helper.md).
    secret: bytes | None = None
    hello: gp.Hello | None = None
    _stream: ByteStream | None = None
    #: Protects the agent stream's write side: one whole frame at a time
    #: (helper calls, relayed clients and cancels write concurrently).
    _send_lock: anyio.Lock = field(default_factory=anyio.Lock)
    _ready: anyio.Event = field(default_factory=anyio.Event)
    _routes: dict[int, _Route] = field(default_factory=dict)
    _retry: list[_Route] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _closed: bool = False
    _retry_deadline: float = 0.0
    connects: int = 0
    garbage_frames: int = 0
    #: Monotonic time of the last client activity (a request from a relayed
    #: client, an answer to one, or :meth:`touch`): the VM's idle time limit
    #: counts from it.  A plain store on each request, no lock.
    last_activity: float = field(default_factory=time.monotonic)

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the channel up until cancelled: connect, handshake, relay, reconnect."""
        backoff = 0.05
        try:
            while True:
                try:
                    stream = await self.connect()
                except Exception as exc:  # socket not there (yet), VM gone: retry
                    log.debug("guest_connect_failed", vm=self.name, error=str(exc))
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    self._expire_retries()
                    continue
                async with stream:
                    try:
                        with map_exceptions(_CHANNEL_BROKEN):
                            await self._session(stream)
                        backoff = 0.05
                    except GuestChannelBroken as exc:
                        log.warning("guest_channel_broken", vm=self.name, error=exc.message)
                    except Exception:
                        # A bug must not take the helper down: log, reconnect.
                        log.exception("guest_channel_failed", vm=self.name)
                    finally:
                        self._on_drop()
                        self._expire_retries()
                await anyio.sleep(backoff)
        finally:
            self._closed = True
            self._fail_all(ErrorCode.UNAVAILABLE, f"VM {self.name!r} is gone")

    async def wait_ready(self, timeout: float) -> gp.Hello:
        """The agent's Hello once the channel is up (TimeoutError after ``timeout``)."""
        with anyio.fail_after(timeout):
            await self._ready.wait()
        if self.hello is None:  # the channel sets hello before it signals ready
            raise GuestChannelBroken(f"VM {self.name!r}: the guest channel has no hello")
        return self.hello

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def touch(self) -> None:
        """Note client activity that did not pass through the channel."""
        self.last_activity = time.monotonic()

    @property
    def client_busy(self) -> bool:
        """A relayed client has a request in flight (the VM is in use)."""
        return any(isinstance(r.sink, ClientSink) for r in self._routes.values())

    async def _session(self, stream: ByteStream) -> None:
        if self.secret is not None:
            auth = gp.Auth(id=0, secret=self.secret)
            await stream.send(encode_frame(gp.request_codec.encode(auth), GUEST_MAX_FRAME))
        items = _guest_items(stream)
        sync = await _handshake(stream, items)
        hello = sync.hello
        if hello is None:  # _handshake returns only once a session started
            raise GuestChannelBroken("the guest agent never greeted")
        self.hello = hello
        self._stream = stream
        self.connects += 1
        self._ready.set()
        log.info("guest_channel_up", vm=self.name, session=hello.session)
        await self._resend_retries()
        async for body in items:
            if body is None:
                continue  # a marker: the Hello after it says what it means
            try:
                msg = gp.response_codec.decode(body)
            except DecodeError as exc:
                # A hostile or broken guest: count it, never crash.
                self.garbage_frames += 1
                log.warning("guest_garbage", vm=self.name, error=str(exc)[:200])
                continue
            if isinstance(msg, gp.Hello):
                # The same session greeting again (a virtio flap, a late answer
                # to a repeat of our marker) changes nothing; a new session
                # means the agent restarted and lost what was in flight.
                if sync.on_hello(msg) is not None:
                    raise GuestChannelBroken("the guest agent restarted its session")
                continue
            self._route(msg)
        raise GuestChannelBroken("guest closed the channel")

    def _route(self, msg: Any) -> None:
        route = self._routes.get(msg.id)
        if route is None:
            return  # late answer to a request already failed or cancelled
        if isinstance(route.sink, ClientSink):
            self.last_activity = time.monotonic()
        if not isinstance(msg, INTERMEDIATE):
            del self._routes[msg.id]
            route.sink.forget(route.client_id)
        route.sink.deliver(msgspec.structs.replace(msg, id=route.client_id))

    def _on_drop(self) -> None:
        self._stream = None
        self._ready = anyio.Event()
        if not self._retry:
            # Requests waiting for a reconnect wait this long at most, however
            # many times the reconnect fails.
            self._retry_deadline = anyio.current_time() + RECONNECT_RETRY_WINDOW_S
        routes, self._routes = self._routes, {}
        for r in routes.values():
            if isinstance(r.request, IDEMPOTENT) and not r.retried:
                r.retried = True
                self._retry.append(r)
            else:
                self._fail(r, ErrorCode.UNAVAILABLE, "the guest channel dropped")

    def _expire_retries(self) -> None:
        if self._retry and anyio.current_time() > self._retry_deadline:
            retry, self._retry = self._retry, []
            for r in retry:
                self._fail(r, ErrorCode.UNAVAILABLE, "the guest channel did not come back")

    async def _resend_retries(self) -> None:
        retry, self._retry = self._retry, []
        for r in retry:
            await self._send_upstream(r)

    def _fail(self, r: _Route, code: ErrorCode, message: str) -> None:
        r.sink.forget(r.client_id)
        r.sink.fail(r.client_id, code, message)

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        routes = list(self._routes.values()) + self._retry
        self._routes, self._retry = {}, []
        for r in routes:
            self._fail(r, code, message)

    # --- sending -----------------------------------------------------------------------

    async def _send_upstream(self, route: _Route, client_upstream: dict[int, int] | None = None
                             ) -> int:
        uid = next(self._ids)
        self._routes[uid] = route
        if client_upstream is not None:
            client_upstream[route.client_id] = uid
        await self._write(msgspec.structs.replace(route.request, id=uid))
        return uid

    async def _write(self, msg: Any) -> None:
        stream = self._stream
        if stream is None:
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {self.name!r}: guest channel is down")
        frame = encode_frame(gp.request_codec.encode(msg), GUEST_MAX_FRAME)
        with peer_gone(f"VM {self.name!r}: guest channel"):
            async with self._send_lock:
                await stream.send(frame)

    async def call(self, msg: Any, timeout: float) -> Any:
        """A helper-internal request with a single response.

        Raises :class:`GuestStepFailed` when the guest answers with an error
        (its code and text in the message, never passed off as the helper's
        own), :class:`RequestFailed` (``timeout``, ``unavailable``) when the
        relay gives up on it.
        """
        sink = _CallSink()
        route = _Route(sink=sink, client_id=0, request=msg)
        upstream: int | None = None
        try:
            with anyio.fail_after(timeout):
                await self._ready.wait()
                upstream = await self._send_upstream(route)
                await sink.done.wait()
        except TimeoutError:
            if upstream is not None:
                self._routes.pop(upstream, None)
            self._retry = [r for r in self._retry if r is not route]
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                f"VM {self.name}: the guest agent did not answer {type(msg).__name__} "
                f"within {timeout:.0f} s",
            ) from None
        if sink.error is not None:
            raise sink.error
        resp = sink.response
        if isinstance(resp, gp.Error):
            raise GuestStepFailed(type(msg).__name__, str(resp.code), resp.message)
        return resp

    # --- relaying a client connection -----------------------------------------------------

    async def serve_client(
        self,
        receive: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Relay one client until it disconnects (or overflows its queue).

        ``receive`` returns raw bytes (b"" at end of stream).  The client is
        greeted like the agent greets a host: a sync marker and a Hello; when
        it sends a host sync marker with a nonce, its session restarts (its
        requests in flight are cancelled) and the Hello echoes the nonce.
        """
        if self._closed:
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {self.name!r} is not running")
        hello = await self.wait_ready(HELLO_TIMEOUT_S)
        sink = ClientSink()
        sessions = itertools.count(1)
        sink.deliver_raw(greeting(hello, nonce=b"", session=next(sessions)))
        decoder = HostStreamDecoder(GUEST_MAX_FRAME)
        # Towards its client the relay plays the agent.
        client_sync = AgentSync()
        async with anyio.create_task_group() as tg:

            async def pump() -> None:
                with peer_gone_is_eof():  # client gone
                    while (frame := await sink.next_frame()) is not None:
                        await send(frame)
                tg.cancel_scope.cancel()  # queue closed (overflow) or client gone

            tg.start_soon(pump)
            try:
                while data := await receive():
                    try:
                        items = decoder.feed(data)
                    except RemoteProtocolError as exc:
                        sink.deliver(gp.Error(id=0, code=ErrorCode.PROTOCOL, message=str(exc)))
                        break
                    for item in items:
                        if isinstance(item, HostMarker):
                            if not client_sync.on_marker(item.nonce):
                                continue  # resent before our answer arrived: no new session
                            await self._cancel_client_requests(sink)
                            current = self.hello or hello
                            sink.deliver_raw(
                                greeting(current, nonce=item.nonce, session=next(sessions))
                            )
                        else:
                            await self._from_client(item, sink)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._cancel_client_requests(sink)
                sink.close()
                if sink.overflowed:
                    log.warning("relay_client_overflow", vm=self.name)

    async def _cancel_client_requests(self, sink: ClientSink) -> None:
        """Forget a client's requests in flight and cancel them in the guest."""
        for client_id, upstream in list(sink.upstream.items()):
            self._routes.pop(upstream, None)
            sink.forget(client_id)
            if self._stream is not None:
                # A channel that broke meanwhile cancels everything anyway.
                with anyio.move_on_after(2), contextlib.suppress(HelperError):
                    await self._write(gp.Cancel(id=next(self._ids), target=upstream))

    async def _from_client(self, body: bytes, sink: ClientSink) -> None:
        self.last_activity = time.monotonic()
        try:
            msg = gp.request_codec.decode(body)
        except DecodeError as exc:
            rid = peek_request_id(body)
            sink.deliver(gp.Error(id=rid, code=ErrorCode.INVALID, message=str(exc)[:4000]))
            return
        if isinstance(msg, gp.Auth):
            sink.deliver(gp.Error(id=msg.id, code=ErrorCode.INVALID,
                                  message="auth is between the helper and the guest"))
            return
        if isinstance(msg, gp.CONTINUATIONS):
            upstream = sink.upstream.get(msg.id)
            if upstream is not None and self._stream is not None:
                await self._write(msgspec.structs.replace(msg, id=upstream))
            return
        if isinstance(msg, gp.Cancel):
            target = sink.upstream.get(msg.target)
            if target is not None and self._stream is not None:
                await self._write(gp.Cancel(id=next(self._ids), target=target))
            sink.deliver(gp.Ok(id=msg.id))
            return
        if msg.id in sink.upstream:
            sink.deliver(gp.Error(id=msg.id, code=ErrorCode.INVALID,
                                  message=f"request id {msg.id} is already in flight"))
            return
        route = _Route(sink=sink, client_id=msg.id, request=msg)
        if self._stream is None:
            if isinstance(msg, IDEMPOTENT):
                route.retried = True
                self._retry.append(route)
                return
            self._fail(route, ErrorCode.UNAVAILABLE, "the guest channel is down")
            return
        with contextlib.suppress(HelperError):
            # The read loop notices the drop and fails or retries the route.
            await self._send_upstream(route, sink.upstream)


async def _guest_items(stream: ByteStream) -> AsyncIterator[bytes | None]:
    """Frames (bytes) and session markers (None) from the agent, bounded."""
    decoder = GuestStreamDecoder(GUEST_MAX_FRAME, MAX_SYNC_SCAN)
    while data := await receive_some(stream):
        for item in decoder.feed(data):
            yield item


async def _handshake(stream: ByteStream, items: AsyncIterator[bytes | None]) -> HostSync:
    """Send a host sync marker (again every SYNC_RETRY_S) until the agent
    answers with the Hello that echoes it; the rules are protocol's HostSync."""
    sync = HostSync()
    sync.start()

    async def resend() -> None:
        while sync.awaiting:
            await stream.send(sync.marker)
            await anyio.sleep(SYNC_RETRY_S)

    with anyio.fail_after(HELLO_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(resend)
            async for body in items:
                if body is None:
                    continue
                try:
                    msg = gp.response_codec.decode(body)
                except DecodeError:
                    continue  # stale bytes of an earlier session
                if isinstance(msg, gp.Hello):
                    try:
                        started = sync.on_hello(msg)
                    except VersionMismatch as exc:
                        raise GuestChannelBroken(f"{exc}: rebuild the image") from None
                    if started is not None:
                        break
                elif isinstance(msg, gp.Error) and msg.id == 0:
                    refusal = sync.on_connection_error(msg)
                    if refusal is not None:
                        raise GuestChannelBroken(f"the guest agent refused us: {refusal.message}")
            tg.cancel_scope.cancel()
    if sync.hello is None:
        raise GuestChannelBroken("guest closed the channel before its hello")
    return sync
