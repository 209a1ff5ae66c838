"""Async client of the root helper, used by the frontend.

One connection carries many requests at once: each request is sent as a
copy with a fresh id (the caller's message is never changed), and a reader
task routes every response to the request with the same id
(:mod:`agentiso.frontend.mux`).

Usage::

    async with connect_helper("/run/agentiso/helper.sock") as helper:
        await helper.ping()
        vol = await helper.volume_create(name="ws", source=hp.FromImage(image="minimal"))
        vm = await helper.vm_start(name="ws", volume="ws", timeout=180)

Every request of :data:`agentiso.protocol.helper.HelperRequest` but Hello
(sent by :func:`connect_helper`) and GuestOpen (see
:func:`agentiso.frontend.guest_channel.open_guest`) has a typed method named
like its tag, taking the message's fields as keyword arguments plus
``owner`` (root only: act on that uid's resources) and ``timeout``.  Each
returns the helper's typed answer, or None where the helper answers ``Done``
(or ``Pong``).  All of them go through :meth:`HelperClient.call`.

Timeouts: ``timeout=None`` is the client's ``default_timeout``; 0 means
"now" (fails at once, nothing is sent); a negative or non-finite timeout is
refused with ``InvalidArgument``.

Errors:

* :class:`~agentiso.frontend.errors.InvalidArgument` — an argument is out
  of the message's bounds or a timeout is negative (checked here, nothing is
  sent); it is an ``InvalidRequest``, like the helper's own refusal;
* a :class:`agentiso.protocol.errors.RemoteError` subclass — the helper
  refused or failed this request, with its typed code;
* ``RemoteProtocolError`` — the helper's answer broke the protocol (an
  invalid message, or one of the wrong type: ``UnexpectedMessage``);
* :class:`~agentiso.frontend.errors.RequestTimeout` — no answer in time
  (the request may still complete on the helper);
* :class:`~agentiso.frontend.errors.ConnectionLost` (hop: helper socket) —
  the connection broke; requests in flight may or may not have taken effect;
* :class:`~agentiso.frontend.errors.HelperUnavailable` — could not connect
  or greet the helper at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

import anyio
import msgspec
from anyio.abc import ByteStream

from agentiso.protocol import helper as hp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import (
    DecodeError,
    FramingError,
    RemoteProtocolError,
    UnexpectedMessage,
    remote_error,
)
from agentiso.protocol.framing import HEADER_SIZE, frame_length
from agentiso.protocol.stream import FrameReader

from .errors import ConnectionLost, HelperUnavailable, Hop, InvalidArgument, RequestTimeout
from .mux import (
    TRANSPORT_ERRORS,
    Deadline,
    ErrorFactory,
    Mux,
    encode_checked,
    resolve_timeout,
    send_whole_frame,
    tag_of,
)

DEFAULT_TIMEOUT_S = 30.0
R = TypeVar("R", bound=hp.HelperResponse)

#: What to do when the helper hung up on us before the session was usable.
_SEE_ITS_LOG = "see the helper's log (journalctl -u agentiso-helper), then retry"
_LOST_ADVICE = (
    "the helper may have stopped or restarted: reconnect; a request that was in"
    " flight may or may not have taken effect (check with a get or list request)"
)
_TIMEOUT_ADVICE = (
    "it may still complete on the helper: check its effect with a get or list"
    " request before retrying, or pass a longer timeout"
)

#: What ends an exchange before the reader task runs: the connection is gone.
_GONE: tuple[type[BaseException], ...] = (ConnectionLost, *TRANSPORT_ERRORS)

#: ``VmStart``'s default policy (no egress, no peers); never mutated.
_DEFAULT_NETWORK = hp.NetworkPolicy()


class HelperClient:
    """A connected, greeted helper session.  Create it with :func:`connect_helper`.

    ``hello`` holds the helper's ``HelloOk``; ``default_timeout`` is used by
    every request whose ``timeout`` is None."""

    def __init__(
        self, stream: ByteStream, *, path: str = "", default_timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._stream = stream
        self._where = f"the agentiso helper at {path}" if path else "the agentiso helper"
        self.default_timeout = resolve_timeout(default_timeout, DEFAULT_TIMEOUT_S)
        self._send_lock = anyio.Lock()
        self._mux: Mux[hp.HelperResponse] = Mux()
        self.hello: hp.HelloOk | None = None

        async def receive() -> bytes:
            try:
                return await stream.receive(65536)
            except anyio.EndOfStream:
                return b""

        self._reader = FrameReader(receive, hp.HELPER_MAX_FRAME)

    # --- the one request path --------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The connection is gone: every request fails (connect again)."""
        return self._mux.closed

    async def request(
        self, msg: hp.HelperRequest, *, timeout: float | None = None
    ) -> hp.HelperResponse:
        """Send a copy of ``msg`` under a fresh id and return the response.
        ``Error`` answers are raised as their RemoteError subclass."""
        if isinstance(msg, hp.Hello | hp.GuestOpen):
            # Hello is the handshake's; GuestOpen would turn this multiplexed
            # connection into a guest channel under the other requests' feet.
            raise InvalidArgument(
                f"{tag_of(msg)} cannot be sent on an open helper session"
                " (connect_helper says hello; open_guest opens a guest channel)"
            )
        seconds = resolve_timeout(timeout, self.default_timeout)
        deadline = Deadline.after(
            seconds, f"{tag_of(msg)} sent to {self._where}", _TIMEOUT_ADVICE
        )
        pending = self._mux.open()
        try:
            frame = encode_checked(
                hp.request_codec, msgspec.structs.replace(msg, id=pending.id), hp.HELPER_MAX_FRAME
            )
            with deadline.limit():
                await self._send(frame)
            resp = await pending.receive(deadline)
        finally:
            self._mux.forget(pending)
        if isinstance(resp, hp.Error):
            raise remote_error(resp.code, resp.message)
        return resp

    async def call(
        self, msg: hp.HelperRequest, expect: type[R], *, timeout: float | None = None
    ) -> R:
        """:meth:`request`, checking that the answer is of type ``expect``."""
        resp = await self.request(msg, timeout=timeout)
        if not isinstance(resp, expect):
            raise UnexpectedMessage(f"{tag_of(expect)} in answer to {tag_of(msg)}", resp)
        return resp

    # --- typed requests (names and fields as in agentiso.protocol.helper) -----------

    async def ping(self, *, owner: int | None = None, timeout: float | None = None) -> None:
        await self.call(hp.Ping(id=0, owner=owner), hp.Pong, timeout=timeout)

    async def whoami(
        self, *, owner: int | None = None, timeout: float | None = None
    ) -> hp.Identity:
        return await self.call(hp.WhoAmI(id=0, owner=owner), hp.Identity, timeout=timeout)

    async def image_list(
        self, *, owner: int | None = None, timeout: float | None = None
    ) -> hp.Images:
        return await self.call(hp.ImageList(id=0, owner=owner), hp.Images, timeout=timeout)

    # volumes and snapshots

    async def volume_create(
        self, *, name: str, source: hp.VolumeSource, size_bytes: int | None = None,
        owner: int | None = None, timeout: float | None = None,
    ) -> hp.VolumeInfo:
        msg = hp.VolumeCreate(id=0, name=name, source=source, size_bytes=size_bytes, owner=owner)
        return await self.call(msg, hp.VolumeInfo, timeout=timeout)

    async def volume_destroy(
        self, *, name: str, owner: int | None = None, timeout: float | None = None
    ) -> None:
        await self.call(hp.VolumeDestroy(id=0, name=name, owner=owner), hp.Done, timeout=timeout)

    async def volume_get(
        self, *, name: str, owner: int | None = None, timeout: float | None = None
    ) -> hp.VolumeInfo:
        msg = hp.VolumeGet(id=0, name=name, owner=owner)
        return await self.call(msg, hp.VolumeInfo, timeout=timeout)

    async def volume_list(
        self, *, cursor: int = 0, owner: int | None = None, timeout: float | None = None
    ) -> hp.Volumes:
        """Every volume from ``cursor`` on: the helper's pages, joined (``timeout`` per page)."""
        volumes: list[hp.VolumeInfo] = []
        while True:
            got = await self.call(
                hp.VolumeList(id=0, cursor=cursor, owner=owner), hp.Volumes, timeout=timeout
            )
            volumes += got.volumes
            if got.next_cursor is None:
                return hp.Volumes(id=got.id, volumes=volumes)
            cursor = _advance(cursor, got.next_cursor)

    async def volume_grow(
        self, *, name: str, size_bytes: int, owner: int | None = None,
        timeout: float | None = None,
    ) -> hp.VolumeInfo:
        msg = hp.VolumeGrow(id=0, name=name, size_bytes=size_bytes, owner=owner)
        return await self.call(msg, hp.VolumeInfo, timeout=timeout)

    async def snapshot_create(
        self, *, volume: str, snapshot: str, memory: bool = False, owner: int | None = None,
        timeout: float | None = None,
    ) -> hp.VolumeInfo:
        msg = hp.SnapshotCreate(id=0, volume=volume, snapshot=snapshot, memory=memory, owner=owner)
        return await self.call(msg, hp.VolumeInfo, timeout=timeout)

    async def snapshot_rollback(
        self, *, volume: str, snapshot: str, owner: int | None = None,
        timeout: float | None = None,
    ) -> hp.VolumeInfo:
        msg = hp.SnapshotRollback(id=0, volume=volume, snapshot=snapshot, owner=owner)
        return await self.call(msg, hp.VolumeInfo, timeout=timeout)

    async def snapshot_delete(
        self, *, volume: str, snapshot: str, owner: int | None = None,
        timeout: float | None = None,
    ) -> None:
        msg = hp.SnapshotDelete(id=0, volume=volume, snapshot=snapshot, owner=owner)
        await self.call(msg, hp.Done, timeout=timeout)

    # VMs

    async def vm_start(
        self, *, name: str, volume: str, vcpus: int = 1, memory_mib: int = 256,
        resume_snapshot: str | None = None,
        resume_from: hp.FromSnapshot | None = None,
        network: hp.NetworkPolicy | None = _DEFAULT_NETWORK,
        time_limits: hp.TimeLimits | None = None,
        owner: int | None = None, timeout: float | None = None,
    ) -> hp.VmInfo:
        """Boot a VM (``network`` None: no network interface at all), or resume
        saved memory: of its own volume's snapshot (``resume_snapshot``), or of
        the snapshot its volume was cloned from, with a new identity
        (``resume_from``)."""
        msg = hp.VmStart(id=0, name=name, volume=volume, vcpus=vcpus, memory_mib=memory_mib,
                         resume_snapshot=resume_snapshot, resume_from=resume_from,
                         network=network, time_limits=time_limits, owner=owner)
        return await self.call(msg, hp.VmInfo, timeout=timeout)

    async def vm_stop(
        self, *, name: str, timeout_s: float = 30.0, force: bool = False,
        owner: int | None = None, timeout: float | None = None,
    ) -> None:
        """Stop a VM: ``timeout_s`` is the helper's grace period before it
        kills QEMU; ``timeout`` is how long this client waits for the answer
        (give it more than ``timeout_s``)."""
        msg = hp.VmStop(id=0, name=name, timeout_s=timeout_s, force=force, owner=owner)
        await self.call(msg, hp.Done, timeout=timeout)

    async def vm_get(
        self, *, name: str, owner: int | None = None, timeout: float | None = None
    ) -> hp.VmInfo:
        return await self.call(hp.VmGet(id=0, name=name, owner=owner), hp.VmInfo, timeout=timeout)

    async def vm_list(
        self, *, cursor: int = 0, owner: int | None = None, timeout: float | None = None
    ) -> hp.Vms:
        """Every VM from ``cursor`` on: the helper's pages, joined (``timeout`` per page)."""
        vms: list[hp.VmInfo] = []
        while True:
            got = await self.call(hp.VmList(id=0, cursor=cursor, owner=owner), hp.Vms,
                                  timeout=timeout)
            vms += got.vms
            if got.next_cursor is None:
                return hp.Vms(id=got.id, vms=vms)
            cursor = _advance(cursor, got.next_cursor)

    async def vm_console(
        self, *, name: str, max_bytes: int = 64 * 1024, owner: int | None = None,
        timeout: float | None = None,
    ) -> hp.ConsoleText:
        msg = hp.VmConsole(id=0, name=name, max_bytes=max_bytes, owner=owner)
        return await self.call(msg, hp.ConsoleText, timeout=timeout)

    async def vm_network_set(
        self, *, name: str, policy: hp.NetworkPolicy, owner: int | None = None,
        timeout: float | None = None,
    ) -> hp.VmInfo:
        msg = hp.VmNetworkSet(id=0, name=name, policy=policy, owner=owner)
        return await self.call(msg, hp.VmInfo, timeout=timeout)

    async def forward_add(
        self, *, vm: str, host_port: int, guest_port: int,
        protocol: Literal["tcp", "udp"] = "tcp", external: bool = False,
        owner: int | None = None, timeout: float | None = None,
    ) -> hp.VmInfo:
        msg = hp.ForwardAdd(id=0, vm=vm, host_port=host_port, guest_port=guest_port,
                            protocol=protocol, external=external, owner=owner)
        return await self.call(msg, hp.VmInfo, timeout=timeout)

    async def forward_remove(
        self, *, vm: str, host_port: int, protocol: Literal["tcp", "udp"] = "tcp",
        owner: int | None = None, timeout: float | None = None,
    ) -> hp.VmInfo:
        msg = hp.ForwardRemove(id=0, vm=vm, host_port=host_port, protocol=protocol, owner=owner)
        return await self.call(msg, hp.VmInfo, timeout=timeout)

    # administration (root only)

    async def admin_list(
        self, *, cursor: int = 0, owner: int | None = None, timeout: float | None = None
    ) -> hp.AdminListing:
        """Everything from ``cursor`` on: the helper's pages, joined (``timeout`` per page)."""
        volumes: list[hp.AdminVolume] = []
        vms: list[hp.AdminVm] = []
        while True:
            got = await self.call(hp.AdminList(id=0, cursor=cursor, owner=owner),
                                  hp.AdminListing, timeout=timeout)
            volumes += got.volumes
            vms += got.vms
            if got.next_cursor is None:
                return hp.AdminListing(id=got.id, volumes=volumes, vms=vms)
            cursor = _advance(cursor, got.next_cursor)

    async def gc(
        self, *, dry_run: bool = True, owner: int | None = None, timeout: float | None = None
    ) -> hp.GcReport:
        return await self.call(hp.Gc(id=0, dry_run=dry_run, owner=owner), hp.GcReport,
                               timeout=timeout)

    # --- internals --------------------------------------------------------------------

    def _lost(self, detail: str, cause: BaseException | None = None) -> ErrorFactory:
        where = self._where
        return lambda: ConnectionLost(
            Hop.HELPER_SOCKET, f"lost the connection to {where} ({detail}); {_LOST_ADVICE}",
            cause=cause,
        )

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            try:
                await send_whole_frame(self._stream, frame)
            except TRANSPORT_ERRORS as exc:  # TimeoutError (a stuck frame) is an OSError
                lost = self._lost(f"sending failed: {exc!r}", exc)
                self._mux.close(lost)
                err = self._mux.closed_error() or lost()
                raise err from err.__cause__

    async def _greet(self, msg: hp.Hello | hp.GuestOpen, seconds: float) -> hp.HelperResponse:
        """One request answered before the reader task runs (hello, and the
        guest_open that ends the helper protocol on this connection).  Reads
        exactly its answer's frame and not a byte more: what follows a
        GuestOpened is the guest stream.  A typed refusal is raised as its
        RemoteError; RequestTimeout when the deadline expires; anything else
        that stops the exchange is HelperUnavailable."""
        what = tag_of(msg)
        deadline = Deadline.after(seconds, f"{what} sent to {self._where}")
        msg = msgspec.structs.replace(msg, id=self._mux.next_id())
        frame = encode_checked(hp.request_codec, msg, hp.HELPER_MAX_FRAME)
        try:
            with deadline.limit():
                await self._send(frame)
                body = await self._read_one_frame()
            resp = None if body is None else hp.response_codec.decode(body)
        except _GONE as exc:
            raise HelperUnavailable(
                f"{self._where} closed the connection during {what} ({exc})",
                advice=_SEE_ITS_LOG, cause=exc,
            ) from exc
        except (FramingError, DecodeError) as exc:  # an oversize frame, or not a response
            raise HelperUnavailable(
                f"{self._where} answered {what} with an invalid frame ({exc})",
                advice="check that the socket is the agentiso helper's and of this version"
                       " (agentiso doctor), then retry",
                cause=exc,
            ) from exc
        if resp is None:
            raise HelperUnavailable(f"{self._where} closed the connection during {what}",
                                    advice=_SEE_ITS_LOG)
        if isinstance(resp, hp.Error):
            raise remote_error(resp.code, resp.message)
        return resp

    async def _read_one_frame(self) -> bytes | None:
        """One frame's body, read exactly (None if the stream ends first)."""
        header = await self._receive_exactly(HEADER_SIZE)
        if header is None:
            return None
        return await self._receive_exactly(frame_length(header, hp.HELPER_MAX_FRAME))

    async def _receive_exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                buf += await self._stream.receive(n - len(buf))
            except anyio.EndOfStream:
                return None
        return bytes(buf)

    async def _handshake(self, client_name: str, timeout: float) -> None:
        hello = hp.Hello(id=0, version=hp.HELPER_PROTOCOL_VERSION, client=client_name)
        try:
            resp = await self._greet(hello, timeout)
        except RequestTimeout as exc:
            raise HelperUnavailable(
                f"{self._where} did not answer hello within {timeout:g} s: it may be hung"
                " or overloaded",
                advice=f"check agentiso-helper status, and {_SEE_ITS_LOG}",
                cause=exc,
            ) from exc
        if not isinstance(resp, hp.HelloOk):
            raise UnexpectedMessage("hello_ok in answer to hello", resp)
        self.hello = resp

    async def _read_loop(self) -> None:
        """Route responses until the connection ends; never raises (the end,
        whatever its cause, fails every pending and later request)."""
        reason = self._lost("the helper closed the connection")
        try:
            while (body := await self._reader.read()) is not None:
                try:
                    resp = hp.response_codec.decode(body)
                except DecodeError as exc:
                    # The framing is intact, so only the request the frame names fails.
                    self._mux.fail_one(peek_request_id(body), self._invalid_answer(exc))
                    continue
                if isinstance(resp, hp.Error) and resp.id == 0:
                    # The helper speaks for the whole connection: it is over.
                    err = remote_error(resp.code, resp.message)
                    reason = self._lost(f"the helper ended it: {err}", err)
                    break
                self._mux.deliver(resp.id, resp, self._duplicate(resp))
        except FramingError as exc:
            reason = self._lost(f"the helper sent an invalid frame: {exc}", exc)
        except TRANSPORT_ERRORS as exc:
            reason = self._lost(repr(exc), exc)
        except Exception as exc:  # a bug here must fail the requests, not hang them
            reason = self._lost(f"the client's reader failed: {exc!r}", exc)
        finally:
            self._mux.close(reason)

    @staticmethod
    def _invalid_answer(exc: DecodeError) -> ErrorFactory:
        return lambda: RemoteProtocolError(f"the helper sent an invalid answer: {exc}")

    @staticmethod
    def _duplicate(resp: hp.HelperResponse) -> ErrorFactory:
        return lambda: RemoteProtocolError(f"the helper answered request {resp.id} twice")

    def _close(self) -> None:
        self._mux.close(
            lambda: ConnectionLost(
                Hop.HELPER_SOCKET, "the helper client was closed (its connect_helper block ended)"
            )
        )


@asynccontextmanager
async def connect_helper(
    path: str, *, timeout: float = 10.0, client_name: str = "agentiso-frontend",
    default_timeout: float = DEFAULT_TIMEOUT_S,
) -> AsyncIterator[HelperClient]:
    """Connect, say hello, and keep a reader task running for the block's duration.

    ``timeout`` bounds the connect and hello (HelperUnavailable when it
    expires); requests whose ``timeout`` is None wait ``default_timeout``."""
    seconds = resolve_timeout(timeout, 10.0)
    stream = await _connect_unix(path, seconds)
    async with stream:
        client = HelperClient(stream, path=path, default_timeout=default_timeout)
        await client._handshake(client_name, seconds)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            # The reader never raises (it fails the pending requests instead),
            # so what the caller's block raises is kept out of the task group
            # and reaches the caller as itself, not inside an ExceptionGroup.
            tg.start_soon(client._read_loop)
            try:
                yield client
            except BaseException as exc:
                error = exc
            finally:
                client._close()
                tg.cancel_scope.cancel()
        if error is not None:
            raise error


async def _connect_unix(path: str, seconds: float) -> anyio.abc.SocketStream:
    """Connect to the helper's socket, or raise HelperUnavailable saying how to start it."""
    with anyio.move_on_after(seconds):
        try:
            return await anyio.connect_unix(path)
        except OSError as exc:
            raise HelperUnavailable(
                f"cannot connect to the agentiso helper at {path}: {exc.strerror or exc}",
                cause=exc,
            ) from exc
    raise HelperUnavailable(f"cannot connect to the agentiso helper at {path} within {seconds:g} s")


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ConnectionLost",
    "HelperClient",
    "HelperUnavailable",
    "RequestTimeout",
    "connect_helper",
]


def _advance(cursor: int, next_cursor: int) -> int:
    """The next page's cursor; one that does not move on would loop forever."""
    if next_cursor <= cursor:
        raise RemoteProtocolError(
            f"the helper's listing did not move on (cursor {cursor}, next {next_cursor})"
        )
    return next_cursor
