"""The helper's socket server: authentication, handshake, concurrent dispatch.

One connection = one authenticated peer.  The server:

1. reads the peer's uid/gid/groups from the kernel (SO_PEERCRED) and refuses
   anyone who is neither root nor in the configured group, with a typed error,
   before reading a single byte from them;
2. expects ``Hello`` with a matching protocol version;
3. serves every further request in its own task (bounded per connection, so a
   flood waits instead of growing memory), answering each with its id.

What one uid can cost is bounded (docs/helper.md, "Connections and
buffers"): connections per uid and in all (root is never counted, so it
always gets in), a deadline for the hello and for an idle connection, and
every byte buffered for a client (a partial frame here, a relayed client's
queue) taken from one :class:`~.limits.BufferBudget`.

A peer that sends garbage gets a typed error; a peer that breaks framing
(oversize length, truncated frame) is disconnected.  Neither affects other
connections.
"""

from __future__ import annotations

import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from agentiso.protocol import helper as hp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import DecodeError, ErrorCode, FramingError, TruncatedFrame
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.stream import FrameReader

from . import __version__
from .accept import accept_forever, raise_nofile_limit
from .actions import ACTION_FOR_REQUEST, ADMIN_ONLY
from .config import HelperConfig, resolve_gid
from .errors import HelperError, RequestFailed
from .limits import CONNECTION_FLOOR, BufferBudget, connection_refusal
from .peercred import PeerCredentials, get_peer_credentials
from .polkit import ConnectionAuthorizer
from .relay_sinks import RelayLimits
from .transport import peer_gone_is_eof, receive_some

if TYPE_CHECKING:
    from .relay import GuestChannel

log = structlog.get_logger("agentiso.helper.server")

LINGER_S = 1.0
#: A connection refused for a cap lingers less: a flood must not hold descriptors.
CAP_LINGER_S = 0.25
MiB = 1024 * 1024
INTERNAL_MESSAGE = "internal error in the helper (details are in its log)"
LINGER_MAX_BYTES = 1 << 20


@dataclass
class RequestContext:
    """What a handler knows about the request beyond its body."""

    peer: PeerCredentials
    server: HelperServer
    #: Whose resources the request names: the peer's own, or (root only)
    #: the request's ``owner``.
    owner: int = -1

    def __post_init__(self) -> None:
        if self.owner < 0:
            self.owner = self.peer.uid


Handler = Callable[[Any, RequestContext], Awaitable[hp.HelperResponse]]
#: Finds the guest channel a GuestOpen asks for (checking ownership) or raises RequestFailed.
GuestOpener = Callable[[hp.GuestOpen, RequestContext], Awaitable["GuestChannel"]]
FrameSource = Callable[[], Awaitable[bytes | None]]


@dataclass
class HelperServer:
    config: HelperConfig
    handlers: dict[type[Any], Handler] = field(default_factory=dict)
    started_monotonic: float = field(default_factory=time.monotonic)
    allowed_gid: int | None = None
    #: Connections open now: all, and per non-root uid.
    connections: int = 0
    by_uid: dict[int, int] = field(default_factory=dict)
    open_guest: GuestOpener | None = None
    budget: BufferBudget = field(init=False)
    _cap_log: _EverySecond = field(init=False)

    def __post_init__(self) -> None:
        if self.allowed_gid is None:
            self.allowed_gid = resolve_gid(self.config.server.group)
        cfg = self.config.server
        self.budget = BufferBudget(cfg.buffer_budget_mib * MiB, cfg.per_uid_buffer_mib * MiB)
        self._cap_log = _EverySecond()
        self.handlers.setdefault(hp.Ping, _ping)
        self.handlers.setdefault(hp.WhoAmI, _whoami)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def user_connections(self) -> int:
        """Connections of non-root uids open now."""
        return sum(self.by_uid.values())

    async def serve(self, listener: SocketListener) -> None:
        """Serve until cancelled (or the listener is closed).  Out of file
        descriptors, connections are refused and the server goes on."""
        soft, hard = raise_nofile_limit()
        log.info("serving", nofile_soft=soft, nofile_hard=hard)
        refusal = encode_frame(hp.response_codec.encode(_error(
            0, ErrorCode.UNAVAILABLE,
            "the helper is out of file descriptors: try again in a moment",
        )))
        async with listener:
            await accept_forever(listener, self._guarded_connection, refusal)

    async def _guarded_connection(self, stream: SocketStream) -> None:
        # A failure in one connection must never take the server down.
        self.connections += 1
        try:
            async with stream:
                await self.handle_connection(stream)
        except Exception:
            log.exception("connection_failed")
        finally:
            self.connections -= 1

    def _admit(self, peer: PeerCredentials) -> str | None:
        """Count the connection of ``peer`` in (None), or say why it is refused."""
        cfg = self.config.server
        why = connection_refusal(
            peer.uid, self.by_uid.get(peer.uid, 0), self.user_connections,
            cfg.max_connections, cfg.max_connections_per_uid,
        )
        if why is None and not peer.is_root:
            self.by_uid[peer.uid] = self.by_uid.get(peer.uid, 0) + 1
        return why

    def _leave(self, peer: PeerCredentials) -> None:
        if peer.is_root:
            return
        left = self.by_uid[peer.uid] - 1
        if left:
            self.by_uid[peer.uid] = left
        else:
            del self.by_uid[peer.uid]

    async def handle_connection(self, stream: SocketStream) -> None:
        sock = stream.extra(SocketAttribute.raw_socket)
        peer = get_peer_credentials(sock)
        conn = _Connection(stream, self.config.server.send_timeout_s)
        logc = log.bind(peer_uid=peer.uid, peer_pid=peer.pid)

        # Caps first: they cost no I/O, so a flood is refused cheaply.
        cap = self._admit(peer)
        if cap is not None:
            # A flood must not become a flood of log lines: one a second per uid.
            suppressed = self._cap_log.allow(peer.uid)
            if suppressed is not None:
                logc.warning("peer_over_connection_cap", reason=cap, suppressed=suppressed)
            await conn.send_error(0, ErrorCode.LIMIT_EXCEEDED, cap)
            await _linger(stream, CAP_LINGER_S)
            return
        try:
            await self._admitted_connection(stream, peer, conn, logc)
        finally:
            self._leave(peer)

    async def _admitted_connection(
        self, stream: SocketStream, peer: PeerCredentials, conn: _Connection, logc: Any
    ) -> None:
        # Group membership, or polkit (asked per action class, cached per connection).
        authz = ConnectionAuthorizer(peer, self.config.server.authorization, self.allowed_gid)
        try:
            await authz.admit()
        except RequestFailed as exc:
            logc.warning("peer_refused", reason=exc.message)
            await conn.send_error(0, exc.code, exc.message)
            await _linger(stream)
            return
        held = _HeldInput(self.budget, peer.uid)

        async def receive() -> bytes:
            data = await receive_some(stream)
            # What the reader will hold once it has this (a partial frame) is budgeted.
            held.hold(reader.buffered + len(data))
            return data

        async def read_frame() -> bytes | None:
            """Next frame, or None when the connection must end (EOF, broken
            framing, or its partial frame over the uid's buffer budget)."""
            try:
                body = await reader.read()
                held.hold(reader.buffered)
                return body
            except TruncatedFrame:
                logc.info("peer_truncated_frame")
            except FramingError as exc:
                logc.warning("peer_framing_error", error=str(exc))
                await conn.send_error(0, ErrorCode.PROTOCOL, str(exc))
            except _OverBudget as exc:
                logc.warning("peer_over_buffer_budget", reason=str(exc))
                await conn.send_error(0, ErrorCode.LIMIT_EXCEEDED, str(exc))
            return None

        def unframed() -> Callable[[], Awaitable[bytes]]:
            """The raw byte source from here on (the stream stops being
            helper-framed), starting with what the reader already buffered."""
            leftover = reader.detach()

            async def raw() -> bytes:
                nonlocal leftover
                if leftover:
                    data, leftover = leftover, b""
                    return data
                return await receive()

            return raw

        reader = FrameReader(receive, hp.HELPER_MAX_FRAME)
        ctx = RequestContext(peer=peer, server=self)
        try:
            if await self._handshake(conn, read_frame):
                await self._request_loop(conn, read_frame, unframed, ctx, authz)
        finally:
            held.hold(0)

    async def _handshake(self, conn: _Connection, read_frame: FrameSource) -> bool:
        with anyio.move_on_after(self.config.server.hello_timeout_s):
            body = await read_frame()
            if body is None:
                return False
            try:
                req = hp.request_codec.decode(body)
            except DecodeError as exc:
                rid = peek_request_id(body)
                await conn.send_error(rid, ErrorCode.PROTOCOL, f"bad hello: {exc}")
                return False
            if not isinstance(req, hp.Hello):
                await conn.send_error(req.id, ErrorCode.PROTOCOL, "the first request must be hello")
                return False
            if req.version != hp.HELPER_PROTOCOL_VERSION:
                await conn.send_error(
                    req.id,
                    ErrorCode.VERSION_MISMATCH,
                    f"helper speaks protocol {hp.HELPER_PROTOCOL_VERSION}, client {req.version}",
                )
                return False
            await conn.send(
                hp.HelloOk(
                    id=req.id,
                    version=hp.HELPER_PROTOCOL_VERSION,
                    server=f"agentiso-helper {__version__}",
                    uptime_s=self.uptime_s,
                )
            )
            return True
        await conn.send_error(
            0, ErrorCode.TIMEOUT,
            f"no hello within {self.config.server.hello_timeout_s:g} s: connection closed",
        )
        return False

    async def _request_loop(
        self,
        conn: _Connection,
        read_frame: FrameSource,
        unframed: Callable[[], Callable[[], Awaitable[bytes]]],
        ctx: RequestContext,
        authz: ConnectionAuthorizer,
    ) -> None:
        cap = self.config.server.max_inflight_per_connection
        idle_s = self.config.server.idle_timeout_s
        slots = anyio.Semaphore(cap)
        #: When the connection last received a frame or finished a request.
        last_active = [time.monotonic()]

        async def serve(req: Any) -> None:
            try:
                await self._serve_one(conn, req, ctx, authz, slots)
            finally:
                last_active[0] = time.monotonic()

        # At end of stream, requests already in flight still complete (a client
        # may half-close after sending); each handler bounds its own duration.
        async with anyio.create_task_group() as tg:
            while True:
                # Idle = nothing in flight, and no frame received and no
                # answer sent for idle_s: the connection is closed (a client
                # reconnects when it needs to).  A frame still arriving after
                # that long is no excuse (a client dribbling bytes holds a slot).
                busy = slots.value < cap
                wait = idle_s if busy else max(0.0, last_active[0] + idle_s - time.monotonic())
                with anyio.move_on_after(wait) as idle:
                    body = await read_frame()
                if idle.cancelled_caught:
                    if slots.value < cap or time.monotonic() - last_active[0] < idle_s:
                        continue  # busy, or an answer went out meanwhile
                    await conn.send_error(
                        0, ErrorCode.TIMEOUT,
                        f"no request for {idle_s:g} s: connection closed (reconnect when needed)",
                    )
                    break
                last_active[0] = time.monotonic()
                if body is None:
                    break
                try:
                    req = hp.request_codec.decode(body)
                except DecodeError as exc:
                    await conn.send_error(peek_request_id(body), ErrorCode.INVALID, str(exc))
                    continue
                if isinstance(req, hp.GuestOpen):
                    # The connection becomes a guest channel; requests already
                    # in flight still complete first.
                    await self._relay(conn, unframed, req, ctx, authz)
                    return
                await slots.acquire()  # a flood waits here instead of growing memory
                tg.start_soon(serve, req)

    async def _relay(
        self,
        conn: _Connection,
        unframed: Callable[[], Callable[[], Awaitable[bytes]]],
        req: hp.GuestOpen,
        ctx: RequestContext,
        authz: ConnectionAuthorizer,
    ) -> None:
        try:
            await authz.authorize(ACTION_FOR_REQUEST[hp.GuestOpen])
            if self.open_guest is None:
                raise RequestFailed(ErrorCode.UNAVAILABLE, "this helper runs no VMs")
            if req.owner is not None:
                if not ctx.peer.is_root:
                    raise RequestFailed(
                        ErrorCode.PERMISSION_DENIED, "only root may act for another owner"
                    )
                ctx = RequestContext(peer=ctx.peer, server=self, owner=req.owner)
            channel = await self.open_guest(req, ctx)
        except HelperError as exc:
            await conn.send(_typed_error(req, exc))
            return
        await conn.send(hp.GuestOpened(id=req.id, vm=req.vm))
        cfg = self.config.server
        limits = RelayLimits(
            queue_bytes=cfg.relay_queue_mib * MiB,
            max_inflight=cfg.max_inflight_per_connection,
            max_inflight_per_vm=cfg.relay_max_inflight_per_vm,
        )
        try:
            await channel.serve_client(
                unframed(), conn.send_raw, uid=ctx.peer.uid, budget=self.budget, limits=limits
            )
        except HelperError as exc:
            log.info("relay_ended", vm=req.vm, reason=exc.message)

    async def _serve_one(
        self,
        conn: _Connection,
        req: Any,
        ctx: RequestContext,
        authz: ConnectionAuthorizer,
        slots: anyio.Semaphore,
    ) -> None:
        try:
            handler = self.handlers.get(type(req))
            if isinstance(req, hp.Hello):
                resp: hp.HelperResponse = _error(req.id, ErrorCode.PROTOCOL, "hello already done")
            elif ACTION_FOR_REQUEST.get(type(req)) in ADMIN_ONLY and not ctx.peer.is_root:
                resp = _error(req.id, ErrorCode.PERMISSION_DENIED, "only root may do this")
            elif req.owner is not None and not ctx.peer.is_root:
                resp = _error(
                    req.id, ErrorCode.PERMISSION_DENIED, "only root may act for another owner"
                )
            elif handler is None:
                name = type(req).__name__
                resp = _error(req.id, ErrorCode.INVALID, f"unsupported request {name}")
            else:
                if req.owner is not None:
                    ctx = RequestContext(peer=ctx.peer, server=self, owner=req.owner)
                try:
                    await authz.authorize(ACTION_FOR_REQUEST[type(req)])
                    resp = await handler(req, ctx)
                except HelperError as exc:
                    resp = _typed_error(req, exc)
                except Exception:
                    log.exception("handler_failed", request=type(req).__name__)
                    resp = _error(req.id, ErrorCode.INTERNAL, INTERNAL_MESSAGE)
            await conn.send(resp)
        finally:
            slots.release()


class _Connection:
    """Serialises frames written by concurrent handlers onto one stream.

    A frame the peer does not take within ``send_timeout_s`` (it stopped
    reading) ends the connection: the stream is closed (part of a frame may
    be out, so nothing more can be framed on it), which the read side sees
    as the end; handlers waiting to answer fail fast instead of holding
    their slots forever.
    """

    def __init__(self, stream: SocketStream, send_timeout_s: float = math.inf) -> None:
        self._stream = stream
        self._send_timeout_s = send_timeout_s
        #: Protects the stream's write side: one whole frame at a time.
        self._lock = anyio.Lock()

    async def send(self, msg: hp.HelperResponse) -> None:
        frame = encode_frame(hp.response_codec.encode(msg), hp.HELPER_MAX_FRAME)
        # A peer that went away is noticed by the read side, which ends the connection.
        with peer_gone_is_eof():
            await self.send_raw(frame)

    async def send_raw(self, data: bytes) -> None:
        """Send bytes already framed (relayed guest frames).  Raises if the
        peer is gone, or did not take them in time (the stream is then closed)."""
        async with self._lock:
            sent = False
            try:
                with anyio.move_on_after(self._send_timeout_s):
                    await self._stream.send(data)
                    sent = True
            finally:
                if not sent:
                    with anyio.CancelScope(shield=True):
                        await self._stream.aclose()
            if not sent:
                log.warning("peer_not_reading", send_timeout_s=self._send_timeout_s,
                            effect="connection closed")
                raise anyio.BrokenResourceError("the peer did not read its answers in time")

    async def send_error(self, rid: int, code: ErrorCode, message: str) -> None:
        await self.send(_error(rid, code, message))


class _EverySecond:
    """Whether to log an event for a key now: at most once a second, saying
    how many were left unlogged since."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, int]] = {}

    def allow(self, key: int) -> int | None:
        """None to stay silent, else the count of events suppressed before this one."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < 1.0:
            self._last[key] = (last, suppressed + 1)
            return None
        if len(self._last) > 4096:  # forget old keys rather than grow
            self._last.clear()
        self._last[key] = (now, 0)
        return suppressed


class _OverBudget(Exception):
    """A client's partial frame would pass its uid's share of the buffer budget."""


class _HeldInput:
    """The bytes one connection's frame reader holds, kept taken from the budget."""

    def __init__(self, budget: BufferBudget, uid: int) -> None:
        self._budget = budget
        self._uid = uid
        self._held = 0

    def hold(self, n: int) -> None:
        """Now ``n`` bytes are held (raises :class:`_OverBudget` if they do not fit)."""
        if n > self._held:
            why = self._budget.take(self._uid, n - self._held, n > CONNECTION_FLOOR)
            if why is not None:
                raise _OverBudget(f"{why}: connection closed")
        else:
            self._budget.give_back(self._uid, self._held - n)
        self._held = n


async def _linger(stream: SocketStream, seconds: float = LINGER_S) -> None:
    """Close our side after a final error, but swallow what the peer already
    sent (bounded, briefly) so its pending writes do not fail with EPIPE before
    it has read our error."""
    with peer_gone_is_eof():
        await stream.send_eof()
        with anyio.move_on_after(seconds):
            drained = 0
            while drained < LINGER_MAX_BYTES:
                drained += len(await stream.receive(65536))


def _typed_error(req: Any, exc: HelperError) -> hp.Error:
    """Every helper error carries the code that says whose fault it is; an
    ``internal`` one is the helper's, and its details stay in the log."""
    if exc.code == ErrorCode.INTERNAL:
        log.error("request_failed", request=type(req).__name__, error=exc.message)
        return _error(req.id, ErrorCode.INTERNAL, INTERNAL_MESSAGE)
    return _error(req.id, exc.code, exc.message)


def _error(rid: int, code: ErrorCode, message: str) -> hp.Error:
    return hp.Error(id=rid, code=code, message=message[:4096])


async def _ping(req: hp.Ping, ctx: RequestContext) -> hp.Pong:
    return hp.Pong(id=req.id)


async def _whoami(req: hp.WhoAmI, ctx: RequestContext) -> hp.Identity:
    p = ctx.peer
    return hp.Identity(id=req.id, uid=p.uid, gid=p.gid, pid=p.pid, admin=p.is_root)


# --- listening socket ------------------------------------------------------------------


async def listener_from_fd(fd: int) -> SocketListener:
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"fd {fd} is not a Unix stream socket")
    sock.setblocking(False)
    return await SocketListener.from_socket(sock)


async def bind_listener(path: Path, mode: int, gid: int | None) -> SocketListener:
    """Bind ``path`` (replacing a stale socket, never another kind of file),
    then set its mode and group."""
    _clear_socket_path(path)
    listener = await anyio.create_unix_listener(path)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
    return listener


def _clear_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()
