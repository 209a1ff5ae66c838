"""Chunked streaming file transfers: download (guest -> host), upload (host -> guest).

Memory stays bounded by the request's credit window: a download reads a chunk
only when the host has credit for it; an upload accepts at most ``window``
chunks ahead of its acknowledgements (the connection refuses more).  Both
directions compute SHA-256 as the bytes pass, so the ends can compare.

An upload writes to a temporary file beside its target and renames it into
place at the end (``exclusive``: links it, so an existing target is never
replaced); on failure or cancellation the temporary file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import TYPE_CHECKING

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from .connection import RequestContext
from .errors import Failed, from_oserror
from .files import make_parents

if TYPE_CHECKING:
    from hashlib import _Hash


def _sha256() -> _Hash:
    """A new sha256.  hashlib is imported on the first transfer, not at the
    agent's start: with OpenSSL's _hashlib behind it, it is about 0.1 s of a
    cold boot under TCG, and most workspaces' first request is an exec."""
    import hashlib

    return hashlib.sha256()


async def handle_download(req: gp.Download, ctx: RequestContext) -> gp.DownloadEnd:
    try:
        fd = os.open(req.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    digest = _sha256()
    sent = 0
    seq = 0
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise Failed(ErrorCode.INVALID, f"{req.path}: is a directory")
        pos = req.offset
        while req.length is None or sent < req.length:
            want = req.chunk_size if req.length is None else min(req.chunk_size,
                                                                  req.length - sent)
            seq += 1
            await ctx.credit.wait_for(seq)
            try:
                data = await asyncio.to_thread(os.pread, fd, want, pos)
            except OSError as exc:
                raise from_oserror(exc, req.path) from None
            if not data:
                break
            digest.update(data)
            pos += len(data)
            sent += len(data)
            await ctx.send(gp.DownloadChunk(id=req.id, seq=seq, data=data))
    finally:
        os.close(fd)
    return gp.DownloadEnd(id=req.id, size=sent, sha256=digest.hexdigest())


def _temp_path(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name[:180]}.agentiso-upload-{os.urandom(6).hex()}")


def _commit(tmp: str, req: gp.UploadBegin, fd: int) -> None:
    os.fchmod(fd, req.perm)
    if req.fsync:
        os.fsync(fd)
    if req.exclusive:
        os.link(tmp, req.path)  # EEXIST if the target appeared meanwhile
        os.unlink(tmp)
    else:
        os.rename(tmp, req.path)


def _open_upload(req: gp.UploadBegin) -> tuple[str, int]:
    if req.parents:
        make_parents(req.path)
    if req.exclusive and os.path.lexists(req.path):
        raise Failed(ErrorCode.ALREADY_EXISTS, f"{req.path}: exists")
    if os.path.isdir(req.path):
        raise Failed(ErrorCode.INVALID, f"{req.path}: is a directory")
    tmp = _temp_path(req.path)
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


async def handle_upload(req: gp.UploadBegin, ctx: RequestContext) -> gp.UploadDone:
    try:
        # Not in a thread: a cancellation must not strand a file it created.
        tmp, fd = _open_upload(req)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    digest = _sha256()
    size = 0
    seq = 0
    committed = False
    try:
        while True:
            msg = await ctx.inbox.get()
            if isinstance(msg, gp.UploadEnd):
                if msg.chunks != seq:
                    raise Failed(ErrorCode.PROTOCOL, f"upload ended after {seq} chunks, "
                                 f"host says {msg.chunks}")
                if msg.sha256 is not None and msg.sha256 != digest.hexdigest():
                    raise Failed(ErrorCode.INVALID, "sha256 mismatch: upload corrupted")
                try:
                    await asyncio.to_thread(_commit, tmp, req, fd)
                except OSError as exc:
                    raise from_oserror(exc, req.path) from None
                committed = True
                return gp.UploadDone(id=req.id, size=size, sha256=digest.hexdigest())
            if not isinstance(msg, gp.UploadChunk):  # the host's frame: checked, not assumed
                raise Failed(ErrorCode.PROTOCOL, f"unexpected {type(msg).__name__} in an upload")
            if msg.seq != seq + 1:
                raise Failed(ErrorCode.PROTOCOL, f"chunk {msg.seq} out of order (want {seq + 1})")
            seq = msg.seq
            try:
                await asyncio.to_thread(_write_all, fd, msg.data)
            except OSError as exc:
                raise from_oserror(exc, req.path) from None
            digest.update(msg.data)
            size += len(msg.data)
            await ctx.send(gp.UploadAck(id=req.id, seq=seq))
    finally:
        os.close(fd)
        if not committed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
