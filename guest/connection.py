"""One host session over a channel: handshake, dispatch by id, resync.

The session reads frames and starts one task per request; responses and
stream events of concurrent requests interleave on the channel, each frame
whole (a write lock).  At most ``max_inflight`` requests run at once: the
reader waits for a free slot before starting another, so a flood of requests
waits in the channel (backpressure) instead of growing memory.  Frames that
continue an in-flight request (acks, upload chunks, cancels) are routed to it
without a slot.  (While the reader waits for a slot it reads nothing, so a host
must not have more than ``max_inflight`` requests outstanding: GuestClient
never does.  A new host's sync marker, too, is seen only once a slot frees.)

On a virtio port the session outlives host disconnects (see
:mod:`agentiso.guest.channel`): when a host is back it is greeted again with
the same session number.

Hostile input never ends the agent: a frame that is not a valid message gets a
typed error and the session goes on.  A frame length above the limit breaks
the stream (we cannot know where the next frame starts); on a socket the
session then ends, on a byte pipe that cannot be reopened (virtio-serial,
socketpair) it answers ``Error(id=0, protocol)`` and discards input until the
host sends ``HOST_SYNC_MAGIC`` + nonce, then greets again (sync marker + Hello).

The host sends that marker whenever it connects, too: a sync marker where a
frame header should be restarts the session in place: in-flight requests are
cancelled (those of frames just before the marker too) and the Hello echoes
the nonce.  The byte stream is decoded by
:class:`agentiso.protocol.guest_stream.HostStreamDecoder`, and which marker
restarts a session is :class:`agentiso.protocol.guest_session.AgentSync`'s
rule: this module only acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agentiso.protocol import guest as gp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import DecodeError, ErrorCode, FramingError
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.guest_session import AgentSync, behind_marker, greeting
from agentiso.protocol.guest_stream import HostMarker, HostStreamDecoder

from . import __version__
from .channel import Channel
from .errors import ChannelClosed, Failed
from .state import AgentState, kernel_uptime

log = logging.getLogger("agentiso.guest.connection")

#: A frame that stays incomplete this long is abandoned (see ``run``)...
MID_FRAME_STALL_S = 3.0
#: ...or, for a big frame, longer than receiving it at this rate (bytes/s) takes.
MIN_FRAME_RATE = 256 * 1024



def load_auth() -> None:
    """Import what authenticating a connection needs, now.  hmac pulls in
    OpenSSL's _hashlib: about 0.1 s of an agent's cold start under TCG, so
    it is imported only where vsock (the only authenticated channel) is
    used, at start-up, so that a VM resumed from a saved template does not
    pay the import in its first, cold, connection."""
    import hmac  # noqa: F401


def secrets_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two secrets (hmac.compare_digest)."""
    import hmac

    return hmac.compare_digest(a, b)

class Credit:
    """Flow control of one outgoing stream: event ``seq`` may be sent once
    the host acknowledged ``seq - window``."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.acked = 0
        self._changed = asyncio.Event()

    def ack(self, seq: int) -> None:
        if seq > self.acked:
            self.acked = seq
            self._changed.set()

    async def wait_for(self, seq: int) -> None:
        while seq > self.acked + self.window:
            self._changed.clear()
            await self._changed.wait()


@dataclass
class RequestContext:
    id: int
    state: AgentState
    session: Session
    credit: Credit = field(default_factory=lambda: Credit(1))
    #: Continuation frames (upload chunks/end) for this request.
    inbox: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(maxsize=1))
    task: asyncio.Task[None] | None = None
    #: Why the task was cancelled (None: the session is closing).
    cancel_reason: tuple[ErrorCode, str] | None = None
    #: The request's final message was produced (or will never be).
    answered: bool = False

    async def send(self, msg: gp.GuestResponse) -> None:
        await self.session.send(msg)

    def cancel(self, code: ErrorCode, message: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = (code, message)
            self.task.cancel()


Handler = Callable[[Any, RequestContext], Awaitable["gp.GuestResponse | None"]]


class Session:
    def __init__(
        self,
        channel: Channel,
        state: AgentState,
        handlers: dict[type[Any], Handler],
        secret: bytes | None = None,
    ) -> None:
        self.channel = channel
        self.state = state
        self.handlers = handlers
        self.secret = secret
        self._lock = asyncio.Lock()
        self._inflight: dict[int, RequestContext] = {}
        self._slots = asyncio.Semaphore(state.max_inflight)
        #: vsock: until the Auth frame is accepted, only a small frame is read.
        self._authenticated = secret is None
        self._decoder = HostStreamDecoder(
            gp.GUEST_MAX_FRAME if self._authenticated else gp.AUTH_MAX_FRAME)
        self._sync = AgentSync()
        self._greeted = False
        #: A request task was started since the reader last yielded.
        self._started = False
        #: Loop time when the frame being received began (None: between frames).
        self._frame_started: float | None = None

    # --- sending ---------------------------------------------------------------------

    async def send(self, msg: gp.GuestResponse) -> None:
        frame = encode_frame(gp.response_codec.encode(msg), gp.GUEST_MAX_FRAME)
        async with self._lock:
            await self.channel.send(frame)

    async def send_error(self, rid: int, code: ErrorCode, message: str) -> None:
        await self.send(gp.Error(id=rid, code=code, message=message[:4096]))

    async def hello(self, nonce: bytes = b"", new_session: bool = True) -> None:
        """Greet: sync marker + Hello.  ``new_session`` False re-greets a host
        that came back to a virtio port (same session number: nothing lost)."""
        st = self.state
        if new_session or not self._greeted:
            st.sessions += 1
            self._greeted = True
        listen = st.listen if st.listen is not None else st.agent_start
        msg = gp.Hello(
            id=0,
            version=gp.GUEST_PROTOCOL_VERSION,
            agent=f"agentiso-guest {__version__}",
            boot=gp.BootTimings(
                init_t0=st.init_t0, agent_start=st.agent_start, listen=listen,
                hello=kernel_uptime(),
            ),
            transport=self.channel.name,
            max_frame=gp.GUEST_MAX_FRAME,
            max_chunk=gp.MAX_CHUNK,
            max_inflight=st.max_inflight,
            session=st.sessions,
            pid1=st.pid1,
            sync_nonce=nonce,
        )
        data = greeting(msg)
        async with self._lock:
            await self.channel.send(data)

    # --- the session -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the host goes away (or the agent is asked to exit)."""
        try:
            loop = asyncio.get_running_loop()
            auth_deadline = loop.time() + gp.AUTH_TIMEOUT_S
            if self._authenticated:
                await self.hello()
            while not self.state.exit_requested:
                deadline = (self._frame_deadline(loop.time()) if self._authenticated
                            else auth_deadline)
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self.channel.receive()
                except TimeoutError:
                    if not self._authenticated:
                        return  # no Auth frame in time
                    # A host that vanished mid-frame (and a new one whose bytes,
                    # sync markers included, would be swallowed as that frame's
                    # body): give up the frame and look for a marker, in what
                    # the dead frame already swallowed too.
                    log.warning("frame incomplete for too long: discarding it")
                    if not self.channel.resyncable:
                        return
                    self._decoder.resync()
                    self._frame_started = None
                    if not await self._feed(b""):
                        return
                    continue
                if not data:
                    if not self._authenticated or not await self.channel.wait_reconnect():
                        return
                    log.info("host connected to %s again", self.channel.name)
                    await self.hello(new_session=False)
                    continue
                if not await self._feed(data):
                    return
                if self._started:
                    # Let the handlers just started run before reading on: a
                    # read that finds data ready never suspends.  (Not after
                    # every read: a virtio port yields 4 KiB per read.)
                    self._started = False
                    await asyncio.sleep(0)
        except ChannelClosed:
            return
        finally:
            await self._cancel_all()

    async def _feed(self, data: bytes) -> bool:
        """Handle received bytes; False when the session must end."""
        try:
            self._decoder.receive_data(data)
            while (item := self._decoder.next_item()) is not None:
                self._frame_started = None  # any partial frame now is a new one
                if not await self._handle(item):
                    return False
        except FramingError as exc:
            if not self._authenticated:
                return False  # not even an Auth frame: nothing to answer
            await self.send_error(0, ErrorCode.PROTOCOL, str(exc))
            if not self.channel.resyncable:
                return False
            # We cannot know where the next frame starts: drop the session's
            # work and wait for the host's sync marker.
            log.warning("framing broken (%s); waiting for a host sync marker", exc)
            await self._cancel_all()
            self._decoder.resync()
            return await self._feed(b"")
        return True

    async def _handle(self, item: bytes | HostMarker) -> bool:
        if not self._authenticated:
            return await self._authenticate(item)
        if isinstance(item, HostMarker):
            # A host resends its marker until answered; a repeat of the nonce
            # this session already answered must not restart it again.
            if self._sync.on_marker(item.nonce):
                await self._cancel_all()
                await self.hello(item.nonce)
            return True
        await self._dispatch(item)
        return True

    def _frame_deadline(self, now: float) -> float | None:
        """When the frame being received must be complete (None: between frames).

        Counted from the frame's first bytes, not from the last read: a new
        host resending its marker would otherwise keep a dead frame alive.
        Big frames get time at MIN_FRAME_RATE, small ones MID_FRAME_STALL_S."""
        if not self._decoder.mid_frame:
            self._frame_started = None
            return None
        if self._frame_started is None:
            self._frame_started = now
        need = self._decoder.pending_length or 0
        return self._frame_started + max(MID_FRAME_STALL_S, need / MIN_FRAME_RATE)

    async def _authenticate(self, item: bytes | HostMarker) -> bool:
        """vsock: the first item must be an Auth frame with the VM's secret
        (compared in constant time); then the session greets and goes on."""
        msg: object = None
        if isinstance(item, bytes):
            try:
                msg = gp.request_codec.decode(item)
            except DecodeError:
                pass
        if (not isinstance(msg, gp.Auth) or self.secret is None
                or not secrets_equal(msg.secret, self.secret)):
            # Behind a sync marker: the host decodes nothing before one.
            err = gp.Error(id=0, code=ErrorCode.PERMISSION_DENIED, message="authentication failed")
            async with self._lock:
                await self.channel.send(behind_marker(err))
            return False
        self._authenticated = True
        # A listener's channel counts its unauthenticated connections (see
        # transport.AuthGate); other channels have no such hook.
        notify = getattr(self.channel, "authenticated", None)
        if callable(notify):
            notify()
        self._decoder.max_frame = gp.GUEST_MAX_FRAME
        await self.hello()
        return True

    async def _dispatch(self, body: bytes) -> None:
        try:
            msg = gp.request_codec.decode(body)
        except DecodeError as exc:
            await self.send_error(peek_request_id(body), ErrorCode.INVALID, str(exc))
            return
        if isinstance(msg, gp.CONTINUATIONS):
            ctx = self._inflight.get(msg.id)
            if ctx is not None:
                self._continue(ctx, msg)
            return  # a stale continuation of a finished request: ignore
        if isinstance(msg, gp.Cancel):
            target = self._inflight.get(msg.target)
            if target is not None:
                target.cancel(ErrorCode.CANCELLED, "cancelled by the host")
            await self.send(gp.Ok(id=msg.id))
            return
        if msg.id == 0:
            await self.send_error(0, ErrorCode.INVALID, "request id 0 is reserved")
            return
        if msg.id in self._inflight:
            await self.send_error(msg.id, ErrorCode.CONFLICT, "request id already in flight")
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            await self.send_error(msg.id, ErrorCode.INVALID, f"unexpected {type(msg).__name__}")
            return
        await self._slots.acquire()
        # Stream state exists before the handler first runs: continuation
        # frames may arrive (and are routed) before the task is scheduled.
        window = getattr(msg, "window", 1)
        ctx = RequestContext(id=msg.id, state=self.state, session=self, credit=Credit(window),
                             inbox=asyncio.Queue(maxsize=window + 1))
        self._inflight[msg.id] = ctx
        ctx.task = asyncio.get_running_loop().create_task(self._serve(handler, msg, ctx))
        self._started = True
        # A task cancelled before its first step never enters _serve's
        # try/finally: clean up (and answer) from its done callback too.
        ctx.task.add_done_callback(functools.partial(self._settle, ctx))

    def _continue(self, ctx: RequestContext, msg: Any) -> None:
        if isinstance(msg, gp.TransferAck):
            ctx.credit.ack(msg.seq)
            return
        try:
            ctx.inbox.put_nowait(msg)
        except asyncio.QueueFull:
            ctx.cancel(ErrorCode.PROTOCOL, "host sent more chunks than its window allows")

    async def _serve(self, handler: Handler, msg: Any, ctx: RequestContext) -> None:
        resp: gp.GuestResponse | None
        try:
            try:
                resp = await handler(msg, ctx)
            except Failed as exc:
                resp = gp.Error(id=ctx.id, code=exc.code, message=exc.message[:4096])
            except asyncio.CancelledError:
                if ctx.cancel_reason is None:
                    raise
                code, text = ctx.cancel_reason
                resp = gp.Error(id=ctx.id, code=code, message=text)
            except ChannelClosed:
                return
            except Exception:
                log.exception("handler %s failed", type(msg).__name__)
                resp = gp.Error(id=ctx.id, code=ErrorCode.INTERNAL, message="internal error")
            ctx.answered = True
            if resp is not None:
                # Free the id before answering: the host may reuse it at once.
                self._release(ctx)
                await self.send(resp)
        except ChannelClosed:
            pass
        finally:
            self._release(ctx)

    def _settle(self, ctx: RequestContext, _task: object = None) -> None:
        if not ctx.answered and ctx.cancel_reason is not None:
            code, text = ctx.cancel_reason
            ctx.answered = True
            self.state.keep(asyncio.get_running_loop().create_task(
                self._send_quietly(gp.Error(id=ctx.id, code=code, message=text))))
        self._release(ctx)

    async def _send_quietly(self, msg: gp.GuestResponse) -> None:
        with contextlib.suppress(ChannelClosed):
            await self.send(msg)

    def _release(self, ctx: RequestContext) -> None:
        if self._inflight.get(ctx.id) is ctx:
            del self._inflight[ctx.id]
            self._slots.release()

    async def _cancel_all(self) -> None:
        tasks = [c.task for c in self._inflight.values() if c.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
