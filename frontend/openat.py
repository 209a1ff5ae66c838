"""The kernel calls :mod:`.hostpaths` opens host files with: ``openat2(2)``
with ``RESOLVE_BENEATH`` where the kernel has it (probed once), else a walk
of ``openat(..., O_NOFOLLOW)`` one component at a time; ``renameat2(2)``
with ``RENAME_NOREPLACE``; and a directory fsync.  Thin adapters over
syscalls (through ctypes where Python has no binding); the rules of what may
be opened are in :mod:`.hostpaths`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

# --- the kernel interface --------------------------------------------------------------

_SYS_OPENAT2 = 437  # the same number on every architecture (the unified table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = getattr(_libc, "renameat2", None)

#: Whether openat2 works here: None until first tried.  Tests set it to False
#: to exercise the component walk.
openat2_available: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path)
    for _ in range(16):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(raw),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        # EAGAIN: a rename or mount raced with the lookup; the kernel asks to retry.
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _walk(dirfd: int, parts: tuple[str, ...], flags: int, mode: int = 0) -> int:
    """openat2's job without openat2: one component at a time, refusing every symlink."""
    cur = os.dup(dirfd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            f = flags | os.O_NOFOLLOW if last else os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
            try:
                nxt = os.open(name, f | os.O_CLOEXEC, mode, dir_fd=cur)
            except OSError as exc:
                # O_NOFOLLOW reports a link as ELOOP, or ENOTDIR with O_DIRECTORY.
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(cur, name):
                    raise OSError(errno.ELOOP, "symbolic link refused", name) from None
                raise
            if f & os.O_PATH and stat.S_ISLNK(os.fstat(nxt).st_mode):
                # O_PATH | O_NOFOLLOW opens the link itself instead of failing.
                os.close(nxt)
                raise OSError(errno.ELOOP, "symbolic link refused", name)
            os.close(cur)
            cur = nxt
        if not parts:
            nxt = os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=cur)
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _probe_openat2() -> bool:
    """Whether openat2 works here.  Any failure on an open that cannot be
    refused for permissions counts as "no": a seccomp filter may answer
    EPERM instead of ENOSYS for a system call it does not know."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(_openat2(root, ".", os.O_PATH | os.O_DIRECTORY))
        return True
    except OSError:
        return False
    finally:
        os.close(root)


def _open_beneath(dirfd: int, parts: tuple[str, ...], flags: int, mode: int = 0) -> int:
    """Open ``parts`` beneath the directory ``dirfd`` (see the module docstring)."""
    global openat2_available
    if openat2_available is None:
        openat2_available = _probe_openat2()
    if openat2_available:
        return _openat2(dirfd, "/".join(parts) or ".", flags, mode)
    return _walk(dirfd, parts, flags, mode)


def _rename_noreplace(dirfd: int, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` in one directory, failing with EEXIST if ``dst`` exists."""
    if _renameat2 is not None:
        r = _renameat2(
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(src)),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(dst)),
            ctypes.c_uint(RENAME_NOREPLACE),
        )
        if r == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
    # A file system without RENAME_NOREPLACE: link() never replaces either.
    os.link(src, dst, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
    os.unlink(src, dir_fd=dirfd)


def _fsync_dir(dirfd: int) -> None:
    """Make a rename durable; best effort (an O_PATH descriptor cannot be synced)."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
