"""File handlers: read, write, stat, list, remove, mkdir.

Disk I/O runs in worker threads so a slow disk never stalls the event loop
(and with it every other request on the channel).  Every OSError becomes a
typed error through :func:`~agentiso.guest.errors.from_oserror`.
"""

from __future__ import annotations

import asyncio
import os
import stat

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from .connection import RequestContext
from .errors import Failed, from_oserror

_KINDS: tuple[tuple[int, gp.FileKind], ...] = (
    (stat.S_IFREG, "file"),
    (stat.S_IFDIR, "dir"),
    (stat.S_IFLNK, "symlink"),
    (stat.S_IFCHR, "chardev"),
    (stat.S_IFBLK, "blockdev"),
    (stat.S_IFIFO, "fifo"),
    (stat.S_IFSOCK, "socket"),
)


def file_kind(mode: int) -> gp.FileKind:
    fmt = stat.S_IFMT(mode)
    for bits, kind in _KINDS:
        if fmt == bits:
            return kind
    return "unknown"


def stat_info(path: str, st: os.stat_result) -> gp.StatInfo:
    target = None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)[:4095]
        except OSError:
            target = None
    return gp.StatInfo(
        kind=file_kind(st.st_mode), size=st.st_size, perm=stat.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, symlink_target=target,
    )


def _read(path: str, offset: int, length: int) -> tuple[bytes, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Failed(ErrorCode.INVALID, f"{path}: is a directory")
        return os.pread(fd, length, offset), st.st_size
    finally:
        os.close(fd)


async def handle_read(req: gp.FileRead, ctx: RequestContext) -> gp.FileData:
    try:
        data, size = await asyncio.to_thread(_read, req.path, req.offset, req.length)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    # A short read is the end; so is reaching st_size, except that files like
    # those in /proc report size 0 and still have content.
    eof = len(data) < req.length or (size > 0 and req.offset + len(data) >= size)
    return gp.FileData(id=req.id, data=data, eof=eof, size=size)


def make_parents(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)


_WRITE_FLAGS = {
    "truncate": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "create": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "append": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "overwrite": os.O_WRONLY,
}


def _write(req: gp.FileWrite) -> int:
    if req.parents:
        make_parents(req.path)
    existed = os.path.lexists(req.path)
    fd = os.open(req.path, _WRITE_FLAGS[req.mode] | os.O_CLOEXEC, req.perm)
    try:
        if not existed:
            os.fchmod(fd, req.perm)  # the umask must not change what was asked
        view = memoryview(req.data)
        pos = req.offset
        while view:
            if req.mode == "overwrite":
                n = os.pwrite(fd, view, pos)
                pos += n
            else:
                n = os.write(fd, view)
            view = view[n:]
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


async def handle_write(req: gp.FileWrite, ctx: RequestContext) -> gp.FileWritten:
    try:
        size = await asyncio.to_thread(_write, req)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    return gp.FileWritten(id=req.id, size=size)


async def handle_stat(req: gp.FileStat, ctx: RequestContext) -> gp.StatResult:
    try:
        st = os.stat(req.path) if req.follow_symlinks else os.lstat(req.path)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    return gp.StatResult(id=req.id, stat=stat_info(req.path, st))


def _entry(e: os.DirEntry[str]) -> gp.DirEntry:
    raw = os.fsencode(e.name)
    try:
        raw.decode("utf-8")
        name, raw_name = e.name, None
    except UnicodeDecodeError:
        name, raw_name = raw.decode("utf-8", "replace"), raw
    try:
        st = e.stat(follow_symlinks=False)
        kind, size = file_kind(st.st_mode), st.st_size
    except OSError:
        kind, size = "unknown", 0
    return gp.DirEntry(name=name[:1024], kind=kind, size=size, raw_name=raw_name)


def _list(path: str, limit: int) -> tuple[list[gp.DirEntry], bool]:
    entries: list[gp.DirEntry] = []
    with os.scandir(path) as it:
        for e in it:
            if len(entries) >= limit:
                return entries, True
            entries.append(_entry(e))
    entries.sort(key=lambda d: d.name)
    return entries, False


async def handle_list(req: gp.ListDir, ctx: RequestContext) -> gp.DirListing:
    try:
        entries, truncated = await asyncio.to_thread(_list, req.path, req.limit)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    return gp.DirListing(id=req.id, entries=entries, truncated=truncated)


def _remove(req: gp.FileRemove) -> None:
    if os.path.normpath(req.path) == "/":
        raise Failed(ErrorCode.INVALID, "refusing to remove /")
    try:
        st = os.lstat(req.path)
    except FileNotFoundError:
        if req.missing_ok:
            return
        raise
    if stat.S_ISDIR(st.st_mode):
        if req.recursive:
            import shutil  # rare; keeps its imports out of the boot path

            shutil.rmtree(req.path)
        else:
            os.rmdir(req.path)
    else:
        os.unlink(req.path)


async def handle_remove(req: gp.FileRemove, ctx: RequestContext) -> gp.Ok:
    try:
        await asyncio.to_thread(_remove, req)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    return gp.Ok(id=req.id)


def _mkdir(req: gp.MakeDir) -> None:
    if req.exist_ok and os.path.isdir(req.path):
        return
    if req.parents:
        make_parents(req.path.rstrip("/") or "/")
    os.mkdir(req.path, req.perm)
    os.chmod(req.path, req.perm)


async def handle_mkdir(req: gp.MakeDir, ctx: RequestContext) -> gp.Ok:
    try:
        await asyncio.to_thread(_mkdir, req)
    except OSError as exc:
        raise from_oserror(exc, req.path) from None
    return gp.Ok(id=req.id)
