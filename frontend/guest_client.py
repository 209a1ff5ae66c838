"""Host-side async client of the guest protocol (:mod:`agentiso.protocol.guest`).

Works over any anyio byte stream: the VM's virtio-serial chardev socket, a
relay connection through the helper (:func:`~.guest_channel.open_guest`), or
a socketpair to an in-process agent in tests.  Imports only the protocol
package, anyio, msgspec and the standard library.

Usage::

    async with GuestClient.connect(stream) as guest:
        result = await guest.exec(["uname", "-a"])
        await guest.upload_file(Path("big.iso"), "/root/big.iso")

Design (the request table is :mod:`agentiso.frontend.mux`, shared with the
helper client):

* Each request is sent as a copy under a fresh id; the caller's message is
  never changed.  One reader task routes frames by id into a small bounded
  buffer per request.  Streams are credit-controlled (the client
  acknowledges each event once consumed), so a buffer never overflows unless
  the guest breaks the protocol, and the reader never blocks: a slow
  consumer of one request cannot stall the others.  A guest that overflows a
  buffer only fails that request (RemoteProtocolError).
* At most ``hello.max_inflight`` requests are outstanding (a semaphore), so
  the agent never has to push back on new requests.
* Timeouts: ``timeout=None`` is ``default_timeout``; 0 means "now" (a new
  request fails at once, unsent); negative or non-finite is InvalidArgument.
  A request that gets no answer in time raises
  :class:`~agentiso.frontend.errors.RequestTimeout` after a best-effort
  Cancel in the guest.

Errors:

* a :class:`RemoteError` subclass (:class:`NotFound`,
  :class:`PermissionDenied`, ...) — the agent's typed answer;
* :class:`~agentiso.frontend.errors.InvalidArgument` (an InvalidRequest) —
  an argument refused here, before sending;
* ``RemoteProtocolError`` — this request's answer broke the protocol (an
  invalid message, the wrong type, a checksum mismatch, an overflowed window);
* :class:`~agentiso.frontend.errors.ConnectionLost` — the channel closed
  (hop: ``hop`` given to :meth:`GuestClient.connect`, the helper relay for
  :func:`~.guest_channel.open_guest`), the guest broke the protocol, or the
  agent started a new session (hop: guest agent); its ``__cause__`` is the
  underlying error;
* from :meth:`GuestClient.connect` only: VersionMismatch, or the agent's
  refusal (PermissionDenied for a wrong secret), or RequestTimeout when no
  Hello comes.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import RemoteProtocolError, UnexpectedMessage

from .errors import InvalidArgument
from .guest_session import DEFAULT_TIMEOUT_S, GuestSession
from .mux import build_checked, resolve_timeout

#: How long an exec may run past its own ``timeout_s`` before we give up on
#: its answer (the agent kills the command at ``timeout_s`` and then answers).
EXEC_GRACE_S = 30.0

S = TypeVar("S", bound=msgspec.Struct)
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


class GuestClient(GuestSession):
    """A session with one guest agent, with a method per request.  Create it
    with :meth:`connect`."""

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
        fits in one response.  ``timeout_s`` is the command's own limit (the
        agent kills it then); the client waits ``EXEC_GRACE_S`` longer for
        the answer before raising RequestTimeout."""
        if stream is None:
            stream = on_output is not None or max(stdout_cap, stderr_cap) > gp.MAX_INLINE_OUTPUT
        req = _build(gp.Exec, argv=argv, shell=shell, cwd=cwd, env=env or {}, stdin=stdin,
                     timeout_s=timeout_s, stdout_cap=stdout_cap, stderr_cap=stderr_cap,
                     stream=stream, window=window)
        deadline = self._deadline(req, timeout_s + EXEC_GRACE_S)
        out = bytearray()
        err = bytearray()
        async with self._open(req, buffer=window + 2, deadline=deadline) as pending:
            while True:
                msg = await self._next(pending, deadline)
                if isinstance(msg, gp.ExecOutput):
                    if on_output is not None:
                        r = on_output(msg.stream, msg.data)
                        if r is not None:
                            await r
                    else:
                        (out if msg.stream == "stdout" else err).extend(msg.data)
                    await self._send(gp.TransferAck(id=pending.id, seq=msg.seq), deadline)
                    continue
                if not isinstance(msg, gp.ExecResult):
                    raise UnexpectedMessage("exec_output or exec_result", msg)
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
        timeout_s: float | None = None, timeout: float | None = None,
    ) -> gp.JobStarted:
        """Start a background job (``timeout_s``: the job's own limit;
        ``timeout``: how long to wait for the agent to confirm the start)."""
        req = _build(gp.JobStart, argv=argv, shell=shell, cwd=cwd, env=env or {}, stdin=stdin,
                     ring_bytes=ring_bytes, timeout_s=timeout_s)
        return await self.request(req, gp.JobStarted, timeout)

    async def job_poll(self, job: int, stdout_offset: int = 0, stderr_offset: int = 0,
                       max_bytes: int = 256 * 1024, wait_s: float = 0.0, *,
                       timeout: float | None = None) -> gp.JobStatus:
        """Output since the offsets, and the job's status; the agent holds the
        answer up to ``wait_s`` for news.  ``timeout`` None: the default
        timeout plus ``wait_s``."""
        req = _build(gp.JobPoll, job=job, stdout_offset=stdout_offset,
                     stderr_offset=stderr_offset, max_bytes=max_bytes, wait_s=wait_s)
        seconds = resolve_timeout(timeout, self.default_timeout + wait_s)
        return await self.request(req, gp.JobStatus, seconds)

    async def job_kill(self, job: int, signal: int = 15, *, timeout: float | None = None) -> None:
        await self.request(_build(gp.JobKill, job=job, signal=signal), gp.Ok, timeout)

    async def job_list(self, *, timeout: float | None = None) -> list[gp.JobInfo]:
        return (await self.request(gp.JobList(id=0), gp.JobListing, timeout)).jobs

    async def job_forget(self, job: int, *, timeout: float | None = None) -> None:
        await self.request(_build(gp.JobForget, job=job), gp.Ok, timeout)

    # files

    async def read_file(self, path: str, offset: int = 0, length: int = gp.MAX_CHUNK, *,
                        timeout: float | None = None) -> gp.FileData:
        req = _build(gp.FileRead, path=path, offset=offset, length=length)
        return await self.request(req, gp.FileData, timeout)

    async def write_file(self, path: str, data: bytes, *, mode: gp.WriteMode = "truncate",
                         offset: int = 0, perm: int = 0o644, parents: bool = False,
                         timeout: float | None = None) -> int:
        req = _build(gp.FileWrite, path=path, data=data, mode=mode, offset=offset, perm=perm,
                     parents=parents)
        return (await self.request(req, gp.FileWritten, timeout)).size

    async def stat(self, path: str, follow_symlinks: bool = False, *,
                   timeout: float | None = None) -> gp.StatInfo:
        req = _build(gp.FileStat, path=path, follow_symlinks=follow_symlinks)
        return (await self.request(req, gp.StatResult, timeout)).stat

    async def list_dir(self, path: str, limit: int = 10_000, *,
                       timeout: float | None = None) -> gp.DirListing:
        req = _build(gp.ListDir, path=path, limit=limit)
        return await self.request(req, gp.DirListing, timeout)

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False,
                     timeout: float | None = None) -> None:
        req = _build(gp.FileRemove, path=path, recursive=recursive, missing_ok=missing_ok)
        await self.request(req, gp.Ok, timeout)

    async def mkdir(self, path: str, *, perm: int = 0o755, parents: bool = False,
                    exist_ok: bool = False, timeout: float | None = None) -> None:
        req = _build(gp.MakeDir, path=path, perm=perm, parents=parents, exist_ok=exist_ok)
        await self.request(req, gp.Ok, timeout)

    # streaming transfers

    async def download(
        self, path: str, write: Callable[[bytes], Awaitable[None]], *, offset: int = 0,
        length: int | None = None, chunk_size: int = gp.DEFAULT_CHUNK, window: int = 8,
        idle_timeout: float | None = None,
    ) -> TransferResult:
        """Stream a guest file into ``write``; the agent's SHA-256 is checked
        against the bytes received.  ``idle_timeout`` (None: the default
        timeout) bounds the wait for each chunk, not the whole transfer."""
        req = _build(gp.Download, path=path, offset=offset, length=length,
                     chunk_size=chunk_size, window=window)
        idle = resolve_timeout(idle_timeout, self.default_timeout, "idle_timeout")
        digest = hashlib.sha256()
        size = 0
        async with self._open(req, buffer=window + 2, deadline=self._deadline(req, idle)) as p:
            while True:
                deadline = self._deadline(req, idle)
                msg = await self._next(p, deadline)
                if isinstance(msg, gp.DownloadChunk):
                    if length is not None and size + len(msg.data) > length:
                        # Never write more than was asked for, whatever the guest sends.
                        raise RemoteProtocolError(
                            f"the guest sent more than the {length} bytes asked for")
                    digest.update(msg.data)
                    size += len(msg.data)
                    await write(msg.data)
                    await self._send(gp.TransferAck(id=p.id, seq=msg.seq), deadline)
                    continue
                if not isinstance(msg, gp.DownloadEnd):
                    raise UnexpectedMessage("download_chunk or download_end", msg)
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
        at most ``window`` chunks ahead of the agent's acknowledgements.
        ``idle_timeout`` (None: the default timeout) bounds each wait for the
        agent, not the whole transfer."""
        req = _build(gp.UploadBegin, path=path, perm=perm, parents=parents,
                     exclusive=exclusive, fsync=fsync, window=window)
        idle = resolve_timeout(idle_timeout, self.default_timeout, "idle_timeout")
        digest = hashlib.sha256()
        size = 0
        sent = 0
        acked = 0
        async with self._open(req, buffer=window + 2, deadline=self._deadline(req, idle)) as p:
            async def expect_ack() -> None:
                nonlocal acked
                msg = await self._next(p, self._deadline(req, idle))
                if not isinstance(msg, gp.UploadAck):
                    raise UnexpectedMessage("upload_ack or upload_done", msg)
                acked = msg.seq

            async for data in chunks:
                if len(data) > gp.MAX_CHUNK:
                    raise InvalidArgument(
                        f"upload: a chunk of {len(data)} bytes, above {gp.MAX_CHUNK}"
                    )
                while sent - acked >= window:
                    await expect_ack()
                sent += 1
                digest.update(data)
                size += len(data)
                await self._send(gp.UploadChunk(id=p.id, seq=sent, data=data),
                                 self._deadline(req, idle))
            end = gp.UploadEnd(id=p.id, chunks=sent, sha256=digest.hexdigest())
            await self._send(end, self._deadline(req, idle))
            while True:
                msg = await self._next(p, self._deadline(req, idle))
                if isinstance(msg, gp.UploadAck):
                    continue
                if not isinstance(msg, gp.UploadDone):
                    raise UnexpectedMessage("upload_ack or upload_done", msg)
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

    async def set_hostname(self, hostname: str, *, timeout: float | None = None) -> None:
        await self.request(_build(gp.SetHostname, hostname=hostname), gp.Ok, timeout)

    async def configure_network(self, *, address: str, prefix: int, mac: str | None = None,
                                interface: str | None = None, gateway: str | None = None,
                                dns: list[str] | None = None, search: list[str] | None = None,
                                mtu: int | None = None, timeout: float | None = None) -> None:
        req = _build(gp.ConfigureNetwork, address=address, prefix=prefix, mac=mac,
                     interface=interface, gateway=gateway, dns=dns or [], search=search or [],
                     mtu=mtu)
        await self.request(req, gp.Ok, timeout)

    async def sync(self, *, timeout: float | None = None) -> None:
        await self.request(gp.Sync(id=0), gp.Ok, timeout)

    async def freeze(self, auto_thaw_s: float = 30.0, *, timeout: float | None = None) -> None:
        await self.request(_build(gp.Freeze, auto_thaw_s=auto_thaw_s), gp.Ok, timeout)

    async def thaw(self, *, timeout: float | None = None) -> None:
        await self.request(gp.Thaw(id=0), gp.Ok, timeout)

    async def set_env(self, set: dict[str, str] | None = None, unset: list[str] | None = None,
                      replace: bool = False, *, timeout: float | None = None) -> None:
        req = _build(gp.SetEnv, set=set or {}, unset=unset or [], replace=replace)
        await self.request(req, gp.Ok, timeout)

    async def shutdown(self, reboot: bool = False, timeout: float | None = 10.0) -> None:
        """Ask the agent to power off (or reboot); only its first answer is awaited."""
        await self.request(_build(gp.Shutdown, reboot=reboot), gp.Ok, timeout)


def _build(cls: type[S], **fields: Any) -> S:
    """Construct a request with id 0 (assigned when sent), checking its bounds now
    so a bad argument fails here with InvalidArgument, not in the agent."""
    return build_checked(gp.request_codec, cls, **fields)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXEC_GRACE_S",
    "ExecOutcome",
    "GuestClient",
    "OutputCallback",
    "TransferResult",
]
