"""Host-side async client of the guest protocol (:mod:`agentiso.protocol.guest`).

Works over any anyio byte stream: the VM's virtio-serial chardev socket, a
relay connection through the helper, or a socketpair to an in-process agent in
tests.  Imports only the protocol package, anyio and the standard library.

Usage::

    async with GuestClient.connect(stream) as guest:
        result = await guest.exec(["uname", "-a"])
        await guest.upload_file(Path("big.iso"), "/root/big.iso")

Design:

* One reader task demultiplexes frames by request id into a small bounded
  buffer per request.  Streams are credit-controlled (the client acknowledges
  each event once consumed), so a buffer never overflows unless the guest
  breaks the protocol, and the reader never blocks: a slow consumer of one
  request cannot stall the others.  A guest that overflows a buffer only fails
  that request.
* At most ``hello.max_inflight`` requests are outstanding (a semaphore), so
  the agent never has to push back on new requests.
* A guest that sends garbage fails the connection with a ProtocolError; a
  second Hello (the agent resynchronised or the VM's agent restarted) fails
  every in-flight request with :class:`Unavailable`.
* Errors from the guest are raised as :class:`RemoteError` subclasses
  (:class:`NotFound`, :class:`PermissionDenied`, ...); a request that gets no
  answer in time raises :class:`RemoteTimeout` after a best-effort Cancel.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import (
    DecodeError,
    ErrorCode,
    InvalidRequest,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RemoteTimeout,
    Unavailable,
    VersionMismatch,
    remote_error,
)
from agentiso.protocol.framing import encode_frame

DEFAULT_TIMEOUT_S = 60.0
#: How often the host sync marker is resent until the agent answers it.
SYNC_RETRY_S = 1.0

R = TypeVar("R")
OutputCallback = Callable[[gp.OutputStream, bytes], Awaitable[None] | None]


@dataclass
class ExecOutcome:
    """How a command ended, and its output (empty when streamed to a callback)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class TransferResult:
    size: int
    sha256: str


class _Pending:
    """The receive side of one request's responses."""

    def __init__(self, buffer: int) -> None:
        send, recv = anyio.create_memory_object_stream[Any](buffer)
        self.send: MemoryObjectSendStream[Any] = send
        self.recv: MemoryObjectReceiveStream[Any] = recv
        #: The request's last message, once received (no Cancel needed then).
        self.final: Any = None


class GuestClient:
    def __init__(self, stream: anyio.abc.ByteStream, default_timeout: float = DEFAULT_TIMEOUT_S):
        self._stream = stream
        self.default_timeout = default_timeout
        self._send_lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._hello_event = anyio.Event()
        self.hello: gp.Hello | None = None
        #: The nonce of our last sync marker until its Hello arrives.
        self._await_nonce: bytes | None = None
        self._slots: anyio.Semaphore | None = None
        self._closed: BaseException | None = None
        #: Connection-level errors (id 0) received from the agent.
        self.connection_errors: list[gp.Error] = []

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
    ) -> AsyncIterator[GuestClient]:
        """Start the reader, (authenticate,) wait for Hello and check its version."""
        client = cls(stream, default_timeout)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            # The reader never raises (it records why it stopped in _closed),
            # so the only exception here is the caller's: keep it out of the
            # task group, so callers see it as is rather than in an ExceptionGroup.
            tg.start_soon(client._reader)
            try:
                if secret is not None:
                    await client._send(gp.Auth(id=0, secret=secret))
                await client._sync(hello_timeout)
                yield client
            except BaseException as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
                client._fail_all(Unavailable("guest client closed"))
        if error is not None:
            raise error

    async def wait_hello(self, timeout: float) -> gp.Hello:
        with anyio.move_on_after(timeout):
            await self._hello_event.wait()
        if self._closed is not None:
            raise self._closed
        if self.hello is None:
            raise RemoteTimeout(f"no hello from the guest agent within {timeout} s")
        return self.hello

    async def resync(self, timeout: float = 10.0) -> gp.Hello:
        """Restart the session in place (e.g. after a framing error): every
        in-flight request fails with Unavailable; returns the new Hello."""
        return await self._sync(timeout)

    async def _sync(self, timeout: float) -> gp.Hello:
        """Send the host sync marker with a fresh nonce and wait for the Hello
        that echoes it (earlier, unprompted Hellos are ignored)."""
        nonce = secrets.token_bytes(gp.SYNC_NONCE_LEN)
        self._await_nonce = nonce
        self._hello_event = anyio.Event()
        self.hello = None
        deadline = anyio.current_time() + timeout
        # Resent until answered: the agent may be mid-frame of a vanished host
        # (it abandons such a frame after a few seconds) or still booting.
        while True:
            async with self._send_lock:
                try:
                    await self._stream.send(gp.HOST_SYNC_MAGIC + nonce)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                    raise Unavailable("guest channel closed") from None
            left = deadline - anyio.current_time()
            if left <= 0:
                return await self.wait_hello(0)
            with anyio.move_on_after(min(SYNC_RETRY_S, left)):
                await self._hello_event.wait()
            if self._hello_event.is_set():
                return await self.wait_hello(0)

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the channel (tests of hostile input)."""
        async with self._send_lock:
            await self._stream.send(data)

    # --- the reader ------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            await self._read_loop()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                ConnectionError, OSError):
            self._close(Unavailable("guest channel closed"))
        except ProtocolError as exc:
            self._close(exc)
        except Exception as exc:  # a bug here must still fail the requests, not hang them
            self._close(Unavailable(f"guest client reader failed: {exc!r}"))
        else:
            self._close(Unavailable("guest channel closed"))

    async def _read_loop(self) -> None:
        decoder = gp.GuestStreamDecoder(gp.GUEST_MAX_FRAME)
        while True:
            for item in decoder.feed(await self._stream.receive(256 * 1024)):
                if item is not None:
                    self._route(item)

    def _route(self, body: bytes) -> None:
        try:
            msg = gp.response_codec.decode(body)
        except DecodeError as exc:
            raise RemoteProtocolError(f"guest sent an invalid message: {exc}") from None
        if isinstance(msg, gp.Hello):
            if self._await_nonce is not None:
                if msg.sync_nonce != self._await_nonce:
                    return  # a greeting from before our sync marker
                self._await_nonce = None
            elif self.hello is not None and msg.session == self.hello.session:
                return  # the same session greeting again (the port saw us come back)
            if msg.version != gp.GUEST_PROTOCOL_VERSION:
                raise VersionMismatch(gp.GUEST_PROTOCOL_VERSION, msg.version)
            # A new session: whatever was in flight will never be answered.
            self._fail_all(Unavailable(f"guest agent started session {msg.session}"))
            self.hello = msg
            if self._slots is None:
                self._slots = anyio.Semaphore(msg.max_inflight)
            self._hello_event.set()
            return
        if msg.id == 0:
            if isinstance(msg, gp.Error):
                self.connection_errors.append(msg)
                if msg.code == ErrorCode.PERMISSION_DENIED:
                    raise remote_error(msg.code, msg.message)  # authentication refused
            return
        pending = self._pending.get(msg.id)
        if pending is None:
            return  # a late answer to a request we gave up on
        try:
            pending.send.send_nowait(msg)
        except anyio.WouldBlock:
            del self._pending[msg.id]
            pending.send.close()

    def _close(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        self._hello_event.set()
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            try:
                p.send.send_nowait(exc)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                p.send.close()

    # --- request plumbing ------------------------------------------------------------

    async def _send(self, msg: Any) -> None:
        frame = encode_frame(gp.request_codec.encode(msg), gp.GUEST_MAX_FRAME)
        async with self._send_lock:
            try:
                await self._stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                raise Unavailable("guest channel closed") from None

    @asynccontextmanager
    async def _open(self, msg: Any, buffer: int = 2) -> AsyncIterator[_Pending]:
        """Register a request, send it, and yield its response stream."""
        if self._closed is not None:
            raise self._closed
        assert self._slots is not None, "connect() first"
        async with self._slots:
            rid = next(self._ids)
            msg.id = rid
            pending = _Pending(buffer)
            self._pending[rid] = pending
            finished = False
            try:
                await self._send(msg)
                yield pending
                finished = True
            finally:
                if self._pending.pop(rid, None) is not None:
                    pending.send.close()
                pending.recv.close()
                if not finished and pending.final is None and self._closed is None:
                    # Abandoned (error, timeout, cancellation): stop the agent's work.
                    await self._cancel_remote(rid)

    async def _next(self, pending: _Pending, deadline: float, rid: int) -> Any:
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
            try:
                item = await pending.recv.receive()
            except anyio.EndOfStream:
                raise RemoteProtocolError("guest overflowed a stream's credit window") from None
            if isinstance(item, BaseException):
                pending.final = item
                raise item
            if not isinstance(item, gp.STREAM_EVENTS):
                pending.final = item
            if isinstance(item, gp.Error):
                raise remote_error(item.code, item.message)
            return item
        raise RemoteTimeout("no answer from the guest agent in time")

    async def _cancel_remote(self, rid: int) -> None:
        with anyio.move_on_after(1.0, shield=True):
            try:
                await self._send(gp.Cancel(id=next(self._ids), target=rid))
            except RemoteError:
                pass

    async def request(self, msg: Any, expect: type[R], timeout: float | None = None) -> R:
        """Send ``msg`` (its id is assigned) and return its single response."""
        deadline = anyio.current_time() + (timeout or self.default_timeout)
        async with self._open(msg) as pending:
            resp = await self._next(pending, deadline, msg.id)
        if not isinstance(resp, expect):
            raise RemoteProtocolError(f"expected {expect.__name__}, got {type(resp).__name__}")
        return resp

    # --- simple requests -------------------------------------------------------------

    async def ping(self, timeout: float | None = None) -> gp.Pong:
        return await self.request(gp.Ping(id=0), gp.Pong, timeout)

    async def exec(
        self,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes = b"",
        timeout_s: float = 600.0,
        stdout_cap: int = gp.MAX_INLINE_OUTPUT,
        stderr_cap: int = gp.MAX_INLINE_OUTPUT,
        stream: bool | None = None,
        on_output: OutputCallback | None = None,
        window: int = 16,
    ) -> ExecOutcome:
        """Run a command.  Output is collected in memory up to the caps, or with
        ``on_output`` handed to it chunk by chunk as it comes (streaming).
        Streaming is used when ``on_output`` is given or a cap exceeds what
        fits in one response."""
        if stream is None:
            stream = on_output is not None or max(stdout_cap, stderr_cap) > gp.MAX_INLINE_OUTPUT
        req = _build(gp.Exec, argv=argv, shell=shell, cwd=cwd, env=env or {}, stdin=stdin,
                     timeout_s=timeout_s, stdout_cap=stdout_cap, stderr_cap=stderr_cap,
                     stream=stream, window=window)
        deadline = anyio.current_time() + timeout_s + 30.0
        out = bytearray()
        err = bytearray()
        async with self._open(req, buffer=window + 2) as pending:
            while True:
                msg = await self._next(pending, deadline, req.id)
                if isinstance(msg, gp.ExecOutput):
                    if on_output is not None:
                        r = on_output(msg.stream, msg.data)
                        if r is not None:
                            await r
                    else:
                        (out if msg.stream == "stdout" else err).extend(msg.data)
                    await self._send(gp.TransferAck(id=req.id, seq=msg.seq))
                    continue
                if not isinstance(msg, gp.ExecResult):
                    raise RemoteProtocolError(f"unexpected {type(msg).__name__} in exec")
                return ExecOutcome(
                    exit_code=msg.exit_code, signal=msg.signal, timed_out=msg.timed_out,
                    duration_s=msg.duration_s,
                    stdout=bytes(out) if stream else msg.stdout,
                    stderr=bytes(err) if stream else msg.stderr,
                    stdout_bytes=msg.stdout_bytes, stderr_bytes=msg.stderr_bytes,
                    stdout_truncated=msg.stdout_truncated, stderr_truncated=msg.stderr_truncated,
                )

    # jobs

    async def job_start(
        self, argv: list[str] | None = None, *, shell: str | None = None, cwd: str | None = None,
        env: dict[str, str] | None = None, stdin: bytes = b"", ring_bytes: int = 1024 * 1024,
        timeout_s: float | None = None,
    ) -> gp.JobStarted:
        req = _build(gp.JobStart, argv=argv, shell=shell, cwd=cwd, env=env or {}, stdin=stdin,
                     ring_bytes=ring_bytes, timeout_s=timeout_s)
        return await self.request(req, gp.JobStarted)

    async def job_poll(self, job: int, stdout_offset: int = 0, stderr_offset: int = 0,
                       max_bytes: int = 256 * 1024, wait_s: float = 0.0) -> gp.JobStatus:
        req = _build(gp.JobPoll, job=job, stdout_offset=stdout_offset,
                     stderr_offset=stderr_offset, max_bytes=max_bytes, wait_s=wait_s)
        return await self.request(req, gp.JobStatus, self.default_timeout + wait_s)

    async def job_kill(self, job: int, signal: int = 15) -> None:
        await self.request(_build(gp.JobKill, job=job, signal=signal), gp.Ok)

    async def job_list(self) -> list[gp.JobInfo]:
        return (await self.request(gp.JobList(id=0), gp.JobListing)).jobs

    async def job_forget(self, job: int) -> None:
        await self.request(_build(gp.JobForget, job=job), gp.Ok)

    # files

    async def read_file(self, path: str, offset: int = 0, length: int = gp.MAX_CHUNK
                        ) -> gp.FileData:
        return await self.request(_build(gp.FileRead, path=path, offset=offset, length=length),
                                  gp.FileData)

    async def write_file(self, path: str, data: bytes, *, mode: gp.WriteMode = "truncate",
                         offset: int = 0, perm: int = 0o644, parents: bool = False) -> int:
        req = _build(gp.FileWrite, path=path, data=data, mode=mode, offset=offset, perm=perm,
                     parents=parents)
        return (await self.request(req, gp.FileWritten)).size

    async def stat(self, path: str, follow_symlinks: bool = False) -> gp.StatInfo:
        req = _build(gp.FileStat, path=path, follow_symlinks=follow_symlinks)
        return (await self.request(req, gp.StatResult)).stat

    async def list_dir(self, path: str, limit: int = 10_000) -> gp.DirListing:
        return await self.request(_build(gp.ListDir, path=path, limit=limit), gp.DirListing)

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False
                     ) -> None:
        req = _build(gp.FileRemove, path=path, recursive=recursive, missing_ok=missing_ok)
        await self.request(req, gp.Ok)

    async def mkdir(self, path: str, *, perm: int = 0o755, parents: bool = False,
                    exist_ok: bool = False) -> None:
        req = _build(gp.MakeDir, path=path, perm=perm, parents=parents, exist_ok=exist_ok)
        await self.request(req, gp.Ok)

    # streaming transfers

    async def download(
        self, path: str, write: Callable[[bytes], Awaitable[None]], *, offset: int = 0,
        length: int | None = None, chunk_size: int = gp.DEFAULT_CHUNK, window: int = 8,
        idle_timeout: float | None = None,
    ) -> TransferResult:
        """Stream a guest file into ``write``; the agent's SHA-256 is checked
        against the bytes received."""
        req = _build(gp.Download, path=path, offset=offset, length=length,
                     chunk_size=chunk_size, window=window)
        idle = idle_timeout or self.default_timeout
        digest = hashlib.sha256()
        size = 0
        async with self._open(req, buffer=window + 2) as pending:
            while True:
                msg = await self._next(pending, anyio.current_time() + idle, req.id)
                if isinstance(msg, gp.DownloadChunk):
                    digest.update(msg.data)
                    size += len(msg.data)
                    await write(msg.data)
                    await self._send(gp.TransferAck(id=req.id, seq=msg.seq))
                    continue
                if not isinstance(msg, gp.DownloadEnd):
                    raise RemoteProtocolError(f"unexpected {type(msg).__name__} in download")
                if msg.size != size or msg.sha256 != digest.hexdigest():
                    raise RemoteProtocolError("download corrupted: size or sha256 mismatch")
                return TransferResult(size, msg.sha256)

    async def download_file(self, path: str, host_path: Path, **kw: Any) -> TransferResult:
        """Download into ``host_path`` (created or truncated) with bounded memory."""
        async with await anyio.open_file(host_path, "wb") as f:
            async def write(data: bytes) -> None:
                await f.write(data)

            return await self.download(path, write, **kw)

    async def upload(
        self, path: str, chunks: AsyncIterator[bytes], *, perm: int = 0o644,
        parents: bool = False, exclusive: bool = False, fsync: bool = False, window: int = 8,
        idle_timeout: float | None = None,
    ) -> TransferResult:
        """Write a guest file from ``chunks`` (each at most MAX_CHUNK bytes),
        at most ``window`` chunks ahead of the agent's acknowledgements."""
        req = _build(gp.UploadBegin, path=path, perm=perm, parents=parents,
                     exclusive=exclusive, fsync=fsync, window=window)
        idle = idle_timeout or self.default_timeout
        digest = hashlib.sha256()
        size = 0
        sent = 0
        acked = 0
        async with self._open(req, buffer=window + 2) as pending:
            async def expect_ack() -> None:
                nonlocal acked
                msg = await self._next(pending, anyio.current_time() + idle, req.id)
                if not isinstance(msg, gp.UploadAck):
                    raise RemoteProtocolError(f"unexpected {type(msg).__name__} in upload")
                acked = msg.seq

            async for data in chunks:
                if len(data) > gp.MAX_CHUNK:
                    raise InvalidRequest(f"upload chunk above {gp.MAX_CHUNK} bytes")
                while sent - acked >= window:
                    await expect_ack()
                sent += 1
                digest.update(data)
                size += len(data)
                await self._send(gp.UploadChunk(id=req.id, seq=sent, data=data))
            await self._send(gp.UploadEnd(id=req.id, chunks=sent, sha256=digest.hexdigest()))
            while True:
                msg = await self._next(pending, anyio.current_time() + idle, req.id)
                if isinstance(msg, gp.UploadAck):
                    continue
                if not isinstance(msg, gp.UploadDone):
                    raise RemoteProtocolError(f"unexpected {type(msg).__name__} in upload")
                if msg.size != size or msg.sha256 != digest.hexdigest():
                    raise RemoteProtocolError("upload corrupted: size or sha256 mismatch")
                return TransferResult(size, msg.sha256)

    async def upload_file(self, host_path: Path, path: str, *,
                          chunk_size: int = gp.DEFAULT_CHUNK, **kw: Any) -> TransferResult:
        """Upload ``host_path`` with bounded memory (``window`` chunks at most)."""
        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(host_path, "rb") as f:
                while data := await f.read(chunk_size):
                    yield data

        return await self.upload(path, chunks(), **kw)

    async def upload_bytes(self, data: bytes, path: str, *,
                           chunk_size: int = gp.DEFAULT_CHUNK, **kw: Any) -> TransferResult:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), chunk_size):
                yield data[i : i + chunk_size]

        return await self.upload(path, chunks(), **kw)

    # system

    async def set_hostname(self, hostname: str) -> None:
        await self.request(_build(gp.SetHostname, hostname=hostname), gp.Ok)

    async def configure_network(self, *, address: str, prefix: int, mac: str | None = None,
                                interface: str | None = None, gateway: str | None = None,
                                dns: list[str] | None = None, search: list[str] | None = None,
                                mtu: int | None = None) -> None:
        req = _build(gp.ConfigureNetwork, address=address, prefix=prefix, mac=mac,
                     interface=interface, gateway=gateway, dns=dns or [], search=search or [],
                     mtu=mtu)
        await self.request(req, gp.Ok)

    async def sync(self) -> None:
        await self.request(gp.Sync(id=0), gp.Ok)

    async def freeze(self, auto_thaw_s: float = 30.0) -> None:
        await self.request(_build(gp.Freeze, auto_thaw_s=auto_thaw_s), gp.Ok)

    async def thaw(self) -> None:
        await self.request(gp.Thaw(id=0), gp.Ok)

    async def set_env(self, set: dict[str, str] | None = None, unset: list[str] | None = None,
                      replace: bool = False) -> None:
        req = _build(gp.SetEnv, set=set or {}, unset=unset or [], replace=replace)
        await self.request(req, gp.Ok)

    async def shutdown(self, reboot: bool = False, timeout: float = 10.0) -> None:
        await self.request(_build(gp.Shutdown, reboot=reboot), gp.Ok, timeout)


S = TypeVar("S")


def _build(cls: type[S], **fields: Any) -> S:
    """Construct a request with id 0 (assigned when sent), checking its bounds now
    so a bad argument fails here with InvalidRequest, not in the agent."""
    try:
        ctor: Any = cls
        msg = ctor(id=0, **fields)
        gp.request_codec.decode(gp.request_codec.encode(msg))
    except (ValueError, TypeError, DecodeError) as exc:
        raise InvalidRequest(f"{cls.__name__}: {exc}") from None
    return cast(S, msg)
