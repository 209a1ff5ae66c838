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

* A slow client never blocks the others: each has a bounded outbound queue
  (:mod:`.relay_sinks`), which everything toward it passes, greetings
  included; a client that lets it overflow, or passes its uid's share of the
  helper's buffer budget, is dropped with the reason logged and sent last
  (its requests' credit windows already bound what a well-behaved client
  can have queued).
* Requests in flight are capped per client and per VM (:class:`RelayLimits`);
  a request over a cap is refused ``limit_exceeded``.  The helper's own calls
  are not counted, so a client flood never blocks a freeze.
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
from agentiso.protocol.framing import HEADER_SIZE, encode_frame
from agentiso.protocol.guest_constants import GUEST_MAX_FRAME, SYNC_RETRY_S
from agentiso.protocol.guest_session import AgentSync, HostSync, greeting
from agentiso.protocol.guest_stream import (
    HOST_MARKER_LEN,
    GuestStreamDecoder,
    HostMarker,
    HostStreamDecoder,
)

from .errors import GuestStepFailed, HelperError, RequestFailed
from .limits import BufferBudget
from .relay_sinks import INTERMEDIATE, CallSink, ClientSink, RelayLimits, Sink
from .transport import STREAM_GONE, PeerGone, peer_gone, peer_gone_is_eof, receive_some

log = structlog.get_logger("agentiso.helper.relay")

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
#: The agent's request slots kept from relayed clients for the helper's own calls.
HELPER_RESERVED_SLOTS = 8
#: How long the guest may leave one frame unread before its channel is re-established.
GUEST_WRITE_TIMEOUT_S = 60.0
#: How long a dropped client gets to read what was queued (and the reason).
DROP_FLUSH_S = 2.0
#: How much unframed noise may precede the agent's sync marker.
MAX_SYNC_SCAN = 1024 * 1024
HELLO_TIMEOUT_S = 30.0
RECONNECT_RETRY_WINDOW_S = 15.0

Connector = Callable[[], Awaitable[ByteStream]]
DEFAULT_LIMITS = RelayLimits()


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


@dataclass
class _Route:
    sink: Sink
    client_id: int
    #: Kept only while it may have to be sent again (idempotent requests,
    #: which are small): a guest that never answers must not make the helper
    #: hold every upload chunk it was sent.
    request: Any
    retried: bool = False


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
    #: A write the guest does not take within this long breaks the channel
    #: (a guest that stops reading must not hold every writer forever).
    write_timeout_s: float = GUEST_WRITE_TIMEOUT_S
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
            if r.request is not None and not r.retried:
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
        msg = route.request
        if not isinstance(msg, IDEMPOTENT):
            route.request = None  # never sent again: do not hold it
        await self._write(msgspec.structs.replace(msg, id=uid))
        return uid

    async def _write(self, msg: Any) -> None:
        stream = self._stream
        if stream is None:
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {self.name!r}: guest channel is down")
        frame = encode_frame(gp.request_codec.encode(msg), GUEST_MAX_FRAME)
        with peer_gone(f"VM {self.name!r}: guest channel"):
            async with self._send_lock:
                sent = False
                try:
                    with anyio.fail_after(self.write_timeout_s):
                        await stream.send(frame)
                    sent = True
                except TimeoutError:
                    raise GuestChannelBroken(
                        f"VM {self.name!r}: the guest read nothing of its channel for "
                        f"{self.write_timeout_s:g} s; the channel is re-established"
                    ) from None
                finally:
                    if not sent:
                        # Part of a frame may be out (a timeout, a caller's
                        # cancel): nothing can be framed on this stream any
                        # more.  Closing it ends the session, which reconnects.
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()

    async def call(self, msg: Any, timeout: float) -> Any:
        """A helper-internal request with a single response.

        Raises :class:`GuestStepFailed` when the guest answers with an error
        (its code and text in the message, never passed off as the helper's
        own), :class:`RequestFailed` (``timeout``, ``unavailable``) when the
        relay gives up on it.
        """
        sink = CallSink()
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
        *,
        uid: int = 0,
        budget: BufferBudget | None = None,
        limits: RelayLimits = DEFAULT_LIMITS,
    ) -> str | None:
        """Relay one client until it disconnects or is dropped.

        ``receive`` returns raw bytes (b"" at end of stream).  The client is
        greeted like the agent greets a host: a sync marker and a Hello; when
        it sends a host sync marker with a nonce, its session restarts (its
        requests in flight are cancelled) and the Hello echoes the nonce.

        What is queued toward the client is bounded by ``limits`` and by
        ``budget`` (its share for ``uid``), and so are its requests in flight
        and the input held for its partial frames.  A client
        that fills its queue is dropped: it gets :data:`DROP_FLUSH_S` to
        read the queue and the last error saying why, then the relay ends.
        Returns why the client was dropped, or None if it left by itself.
        """
        if self._closed:
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {self.name!r} is not running")
        hello = await self.wait_ready(HELLO_TIMEOUT_S)
        sink = ClientSink(limits.queue_bytes, budget, uid)
        try:
            await self._relay_client(receive, send, sink, hello, limits, uid)
        finally:
            sink.release()
        return sink.drop_reason

    async def _relay_client(
        self,
        receive: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes], Awaitable[None]],
        sink: ClientSink,
        hello: gp.Hello,
        limits: RelayLimits,
        uid: int,
    ) -> None:
        sessions = itertools.count(1)
        sink.deliver_raw(greeting(self._client_hello(hello, limits), nonce=b"",
                                  session=next(sessions)))
        decoder = HostStreamDecoder(GUEST_MAX_FRAME)
        # Towards its client the relay plays the agent.
        client_sync = AgentSync()
        async with anyio.create_task_group() as tg:

            async def pump() -> None:
                with peer_gone_is_eof():  # client gone
                    while (frame := await sink.next_frame()) is not None:
                        await send(frame)
                tg.cancel_scope.cancel()  # queue closed (drop, end) or client gone

            async def end_when_dropped() -> None:
                await sink.dropped.wait()
                log.warning("relay_client_dropped", vm=self.name, uid=uid, reason=sink.drop_reason)
                # A client that is not reading gets a moment to catch up
                # (and read why), then it is cut off whatever it does.
                await anyio.sleep(DROP_FLUSH_S)
                tg.cancel_scope.cancel()

            tg.start_soon(pump)
            tg.start_soon(end_when_dropped)
            try:
                while not sink.dropped.is_set() and (data := await receive()):
                    # Input held in the decoder (a partial frame) is budgeted too.
                    if not sink.hold_input(len(data)):
                        break
                    try:
                        items = decoder.feed(data)
                    except RemoteProtocolError as exc:
                        sink.deliver(gp.Error(id=0, code=ErrorCode.PROTOCOL, message=str(exc)))
                        break
                    sink.release_input(sum(
                        HOST_MARKER_LEN if isinstance(i, HostMarker) else HEADER_SIZE + len(i)
                        for i in items
                    ))
                    for item in items:
                        if sink.dropped.is_set():
                            break
                        if isinstance(item, HostMarker):
                            if not client_sync.on_marker(item.nonce):
                                continue  # resent before our answer arrived: no new session
                            await self._cancel_client_requests(sink)
                            current = self.hello or hello
                            sink.deliver_raw(
                                greeting(self._client_hello(current, limits),
                                         nonce=item.nonce, session=next(sessions))
                            )
                        else:
                            await self._from_client(item, sink, limits)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._cancel_client_requests(sink)
                sink.close()

    async def _cancel_client_requests(self, sink: ClientSink) -> None:
        """Forget a client's requests in flight and cancel them in the guest."""
        for client_id, upstream in list(sink.upstream.items()):
            self._routes.pop(upstream, None)
            sink.forget(client_id)
            if self._stream is not None:
                # A channel that broke meanwhile cancels everything anyway.
                with anyio.move_on_after(2), contextlib.suppress(HelperError):
                    await self._write(gp.Cancel(id=next(self._ids), target=upstream))

    def _vm_cap(self, limits: RelayLimits) -> int:
        """Relayed clients' requests the VM takes at once.  The agent runs
        ``hello.max_inflight`` at once and past that stops reading: clients
        get all but a reserve, so the helper's own calls (a freeze, a
        shutdown) always find a slot in the agent."""
        cap = limits.max_inflight_per_vm
        if self.hello is not None:
            cap = min(cap, max(1, self.hello.max_inflight - HELPER_RESERVED_SLOTS))
        return cap

    def _client_hello(self, hello: gp.Hello, limits: RelayLimits) -> gp.Hello:
        """The agent's Hello as a relayed client sees it: ``max_inflight`` is
        what this client may have in flight, so a client that keeps to it
        (as the frontend does) is never refused for its own load."""
        mine = min(hello.max_inflight, limits.max_inflight, self._vm_cap(limits))
        return msgspec.structs.replace(hello, max_inflight=mine)

    def _inflight_refusal(self, sink: ClientSink, limits: RelayLimits) -> str | None:
        """Why a client's new request may not go upstream now, or None."""
        mine = len(sink.upstream) + sum(1 for r in self._retry if r.sink is sink)
        if mine >= limits.max_inflight:
            return (f"{mine} requests of this connection are in flight, the limit is "
                    f"{limits.max_inflight}: wait for answers or cancel some")
        clients = sum(1 for r in self._routes.values() if isinstance(r.sink, ClientSink))
        clients += sum(1 for r in self._retry if isinstance(r.sink, ClientSink))
        vm_cap = self._vm_cap(limits)
        if clients >= vm_cap:
            return (f"{clients} requests are in flight to VM {self.name!r}, the limit is "
                    f"{vm_cap}: wait for answers or cancel some")
        return None

    async def _from_client(self, body: bytes, sink: ClientSink, limits: RelayLimits) -> None:
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
        refusal = self._inflight_refusal(sink, limits)
        if refusal is not None:
            sink.deliver(gp.Error(id=msg.id, code=ErrorCode.LIMIT_EXCEEDED, message=refusal))
            return
        route = _Route(sink=sink, client_id=msg.id, request=msg)
        if self._stream is None:
            if isinstance(msg, IDEMPOTENT):
                route.retried = True
                self._retry.append(route)
                return
            self._fail(route, ErrorCode.UNAVAILABLE, "the guest channel is down")
            return
        try:
            await self._send_upstream(route, sink.upstream)
        except GuestChannelBroken as exc:  # our doing (a write timed out): say why
            log.warning("guest_channel_broken", vm=self.name, error=exc.message)
        except HelperError:
            pass  # the read loop notices the drop and fails or retries the route


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
