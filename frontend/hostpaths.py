"""Host files under the configured roots, opened with the user's own permissions.

``file_upload`` reads and ``file_download`` writes host files in the frontend
(the helper never touches a host file for a client), and only under
the directories of ``host_roots`` in the user's config.toml.

Paths (:meth:`HostRoots.resolve`):

* a relative path is taken relative to the first root;
* an absolute path must lie lexically under a root (the first that contains
  it is used);
* a ``..`` component is refused outright, as is NUL, an empty path, or one
  longer than ``PATH_MAX``; ``.`` and repeated slashes are dropped;
* a path ending in ``/`` names a directory, which a file transfer refuses.

Opening is race-free by construction.  Nothing is checked by name and then
opened by name: every lookup below the root happens inside the kernel,
relative to a file descriptor of the root, in the same system call that opens
the result.

* Where the kernel has ``openat2(2)`` (Linux 5.6+), the whole path is resolved
  in one call with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS``: symbolic links
  are followed as long as they stay beneath the root (a relative link to a
  sibling works) and the call fails if any step, at that very moment, would
  leave it (``..`` past the root, a link to ``/etc``, a ``/proc`` magic link).
  A link whose target is absolute is refused even when it names a place inside
  the root: ``RESOLVE_BENEATH`` treats every absolute target as escaping.
* Where it has not (probed once: ``ENOSYS`` from an old kernel, or ``EPERM``
  from a seccomp filter), the path is walked one component at a time with
  ``openat(..., O_NOFOLLOW)`` relative to the descriptor of the previous
  directory, and every symbolic link is refused.

So a symlink swapped in at any moment either is seen by that one lookup (and
followed only if it stays beneath) or is not seen at all: there is no window
between a check and a use.  Everything done afterwards (creating the temporary
file, renaming it into place, unlinking it) is a single-component operation
relative to the descriptor of the directory that was opened, and none of those
follows a symbolic link in its last component.

A root that is itself a symbolic link (or lies under one) is the user's own
configuration and is trusted: it is resolved once, when :class:`HostRoots` is
built, and paths are opened beneath the directory it resolved to then.  Both
spellings, the configured one and the resolved one, are accepted in absolute
paths; re-pointing the link later does not move the root.

Reading (:meth:`HostRoots.open_read`) opens with ``O_NONBLOCK`` and refuses
anything but a regular file by ``fstat`` on the opened descriptor, so a FIFO
never blocks the caller and a device is never read.

Writing (:meth:`HostRoots.writer`) goes to a new temporary file in the target
directory, created with the user's umask like any new file (an overwritten
file's permission bits are kept), and is renamed into place only by
:meth:`HostWriter.commit`; :meth:`HostWriter.abort` (or an exception in the
``with`` block) removes it, so a failed transfer leaves nothing half-written.
Without ``overwrite`` the rename is ``RENAME_NOREPLACE``, so a file created
meanwhile by someone else is never clobbered.  With ``overwrite`` an existing
symbolic link, directory or special file at the target is refused, never
written through.  If the process is killed mid-transfer, the temporary file
(``.agentiso-*.part`` beside the target) is what remains.

The calls block; async callers run them with ``anyio.to_thread.run_sync`` or
wrap the descriptor (:meth:`HostWriter.fileno`, the reader's ``fileno()``).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import TracebackType
from typing import BinaryIO, Self

from .errors import FrontendError
from .openat import _fsync_dir, _open_beneath, _rename_noreplace

PATH_MAX = 4096
DEFAULT_CONFIG_NAME = "your agentiso config.toml"
TEMP_PREFIX = ".agentiso-"
TEMP_SUFFIX = ".part"

# --- errors ----------------------------------------------------------------------------


class HostPathError(FrontendError):
    """Root of the host path errors: the cause, then what to do (second line)."""

    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


class InvalidHostRoot(HostPathError):
    """A configured root is unusable (relative, missing, not a directory)."""


class InvalidHostPath(HostPathError):
    """The path itself is malformed (empty, NUL, too long)."""


class PathOutsideRoots(HostPathError):
    """The path is not under a root, has ``..``, or a link on it leads out."""


class HostPathNotFound(HostPathError):
    pass


class HostPathExists(HostPathError):
    pass


class NotARegularFile(HostPathError):
    pass


class HostPermissionDenied(HostPathError):
    pass


class HostIOError(HostPathError):
    """Another failure of the host file system (no space, I/O error, ...)."""


# --- roots and paths -------------------------------------------------------------------


@dataclass(frozen=True)
class HostRoot:
    #: As configured (normalised lexically).
    configured: PurePosixPath
    #: What it resolved to when the roots were built; paths are opened beneath this.
    real: PurePosixPath


@dataclass(frozen=True)
class HostPath:
    """A path checked lexically: a root and the components beneath it."""

    root: HostRoot
    parts: tuple[str, ...]

    @property
    def path(self) -> str:
        """The absolute path, spelled under the configured root (for messages)."""
        return str(self.root.configured.joinpath(*self.parts))


class HostRoots:
    """The directories file transfers may use, and race-free opening beneath them."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]], *, config_file: str = "") -> None:
        """Check and resolve ``roots`` (:class:`InvalidHostRoot` if one is unusable).

        ``config_file`` names the user's config file in messages.
        """
        self.config_file = config_file or DEFAULT_CONFIG_NAME
        found: list[HostRoot] = []
        for r in roots:
            text = os.fspath(r)
            if "\0" in text or not text.startswith("/"):
                raise InvalidHostRoot(
                    f"host root {text!r} is not an absolute path",
                    f"Write it absolute in host_roots in {self.config_file}.",
                )
            real = os.path.realpath(text)
            try:
                st = os.stat(real)
            except OSError as exc:
                raise InvalidHostRoot(
                    f"host root {text} cannot be used: {exc.strerror}",
                    f"Create it, or fix host_roots in {self.config_file}.",
                ) from None
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidHostRoot(
                    f"host root {text} is not a directory",
                    f"Fix host_roots in {self.config_file}.",
                )
            found.append(HostRoot(PurePosixPath(os.path.normpath(text)), PurePosixPath(real)))
        self.roots: tuple[HostRoot, ...] = tuple(found)

    def describe(self) -> str:
        return ", ".join(str(r.configured) for r in self.roots) or "none"

    def _outside(self, path: str, why: str) -> PathOutsideRoots:
        return PathOutsideRoots(
            f"host path {path!r} {why} (host roots: {self.describe()})",
            f"Use a path under a host root, or add one to host_roots in {self.config_file}.",
        )

    def resolve(self, path: str) -> HostPath:
        """Check ``path`` lexically and find its root (see the module docstring)."""
        if not isinstance(path, str) or not path:
            raise InvalidHostPath("the host path is empty", "Give a file path.")
        shown = path if len(path) <= 200 else path[:200] + "..."
        if "\0" in path:
            raise InvalidHostPath(f"host path {shown!r} contains NUL", "Remove it.")
        if len(os.fsencode(path)) >= PATH_MAX:
            raise InvalidHostPath(
                f"host path {shown!r} is longer than {PATH_MAX - 1} bytes", "Use a shorter path."
            )
        parts = tuple(p for p in path.split("/") if p not in ("", "."))
        if ".." in parts:
            raise self._outside(shown, "contains '..', which is not allowed")
        if not self.roots:
            raise self._outside(shown, "cannot be used: no host roots are configured")
        if not path.startswith("/"):
            return HostPath(self.roots[0], parts)
        for root in self.roots:
            for base in (root.configured, root.real):
                n = len(base.parts) - 1  # without the leading "/"
                if parts[:n] == base.parts[1:]:
                    return HostPath(root, parts[n:])
        raise self._outside(shown, "is outside the host roots")

    # --- opening -----------------------------------------------------------------------

    @staticmethod
    def _refuse_directory_syntax(path: str, hp: HostPath) -> None:
        # "dir/" names a directory; a file transfer must not quietly drop the slash.
        if path.endswith(("/", "/.")) and hp.parts:
            raise NotARegularFile(
                f"host path {hp.path + '/'!r} names a directory (it ends with '/')",
                "Give the path of a file, without a trailing '/'.",
            )

    def _root_fd(self, hp: HostPath) -> int:
        try:
            return os.open(str(hp.root.real), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, hp, f"its host root {hp.root.configured}") from None

    def _error(self, exc: OSError, hp: HostPath, what: str = "") -> HostPathError:
        """The typed error for ``exc`` met while opening ``hp``."""
        shown = hp.path
        what = what or f"host path {shown!r}"
        e = exc.errno
        if e == errno.EXDEV:
            return self._outside(shown, "leads outside its root through a symbolic link")
        if e == errno.ELOOP:
            return self._outside(
                shown,
                "goes through a symbolic link that is not followed (a loop, an absolute"
                " or /proc link, or any link where the kernel lacks openat2)",
            )
        if e in (errno.ENOENT, errno.ENOTDIR):
            return HostPathNotFound(
                f"{what} does not exist"
                + (" (a part of it is not a directory)" if e == errno.ENOTDIR else ""),
                "Check the path (relative paths start at the first host root).",
            )
        if e in (errno.EACCES, errno.EPERM, errno.EROFS):
            return HostPermissionDenied(
                f"{what}: {os.strerror(e)}",
                "Choose a path you may access, or change its permissions.",
            )
        if e == errno.EEXIST:
            return HostPathExists(
                f"{what} already exists", "Ask to overwrite it, or choose another path."
            )
        if e in (errno.EISDIR, errno.ENXIO):
            return NotARegularFile(f"{what} is not a regular file", "Give a regular file.")
        if e == errno.ENAMETOOLONG:
            return InvalidHostPath(f"{what}: a name on it is too long", "Use shorter names.")
        return HostIOError(f"{what}: {os.strerror(e or 0)}", "Fix the host file system and retry.")

    def open_read(self, path: str) -> tuple[BinaryIO, int]:
        """Open a regular file for reading: the file object and its size.

        Raises :class:`PathOutsideRoots`, :class:`HostPathNotFound`,
        :class:`NotARegularFile`, :class:`HostPermissionDenied` (and the
        others of :class:`HostPathError`).
        """
        hp = self.resolve(path)
        self._refuse_directory_syntax(path, hp)
        rootfd = self._root_fd(hp)
        try:
            # O_NONBLOCK: opening a FIFO returns at once instead of waiting for
            # a writer; O_NOCTTY: a terminal never becomes ours.
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
            fd = _open_beneath(rootfd, hp.parts, flags)
        except OSError as exc:
            raise self._error(exc, hp) from None
        finally:
            os.close(rootfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise NotARegularFile(
                    f"host path {hp.path!r} is {kind}", "Give the path of a regular file."
                )
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), st.st_size
        except BaseException:
            os.close(fd)
            raise

    def writer(self, path: str, *, overwrite: bool = False, parents: bool = False) -> HostWriter:
        """A :class:`HostWriter` that puts a new file at ``path`` when committed.

        ``overwrite``: replace an existing regular file (else
        :class:`HostPathExists`).  ``parents``: create missing directories
        (with the umask's mode; else :class:`HostPathNotFound`).  Checks
        happen now and again at commit; use it as a context manager.
        """
        hp = self.resolve(path)
        self._refuse_directory_syntax(path, hp)
        if not hp.parts:
            raise NotARegularFile(
                f"host path {hp.path!r} is a host root (a directory)", "Give a file path."
            )
        rootfd = self._root_fd(hp)
        try:
            dirfd = self._open_dir(rootfd, hp, parents)
        finally:
            os.close(rootfd)
        name = hp.parts[-1]
        try:
            keep_mode = self._check_target(dirfd, name, hp, overwrite)
            tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o666, dir_fd=dirfd)
            except OSError as exc:
                raise self._error(exc, hp, f"directory of {hp.path!r}") from None
            if keep_mode is not None:
                os.fchmod(fd, keep_mode)
        except BaseException:
            os.close(dirfd)
            raise
        return HostWriter(self, hp, dirfd, tmp, fd, overwrite)

    open_write = writer

    def _open_dir(self, rootfd: int, hp: HostPath, parents: bool) -> int:
        """The directory the file goes in, created (one level at a time) if asked."""
        flags = os.O_PATH | os.O_DIRECTORY
        dirs = hp.parts[:-1]
        try:
            return _open_beneath(rootfd, dirs, flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT or not parents:
                what = f"directory of {hp.path!r}"
                raise self._error(exc, hp, what) from None
        cur = os.open(".", flags | os.O_CLOEXEC, dir_fd=rootfd)
        try:
            for i in range(len(dirs)):
                try:
                    nxt = _open_beneath(rootfd, dirs[: i + 1], flags)
                except FileNotFoundError:
                    # mkdirat of one name relative to the parent's descriptor
                    # never follows a link; a racing creator is fine (EEXIST).
                    try:
                        os.mkdir(dirs[i], 0o777, dir_fd=cur)
                    except FileExistsError:
                        pass
                    nxt = _open_beneath(rootfd, dirs[: i + 1], flags)
                os.close(cur)
                cur = nxt
            return cur
        except OSError as exc:
            os.close(cur)
            raise self._error(exc, hp, f"directory of {hp.path!r}") from None
        except BaseException:
            os.close(cur)
            raise

    def _check_target(self, dirfd: int, name: str, hp: HostPath, overwrite: bool) -> int | None:
        """Refuse what may not be replaced; the permission bits to keep, if any."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, hp) from None
        if not overwrite:
            raise HostPathExists(
                f"host path {hp.path!r} already exists",
                "Ask to overwrite it, or choose another path.",
            )
        if stat.S_ISLNK(st.st_mode):
            raise NotARegularFile(
                f"host path {hp.path!r} is a symbolic link (not replaced)",
                "Give the path of the file it points to.",
            )
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(
                f"host path {hp.path!r} exists and is not a regular file",
                "Choose another path.",
            )
        return stat.S_IMODE(st.st_mode) & 0o777


class HostWriter:
    """A file being written beside its target, put in place only by :meth:`commit`.

    As a context manager it commits when the block succeeds and aborts when it
    raises.  :meth:`commit` and :meth:`abort` are idempotent; after either, the
    writer is closed.  :meth:`commit` syncs the file to disk, which may take a
    while for a big file: async callers run it in a thread at the end of the
    block (``await anyio.to_thread.run_sync(w.commit)``), and the exit then
    has nothing left to do.
    """

    def __init__(
        self, roots: HostRoots, hp: HostPath, dirfd: int, tmp: str, fd: int, overwrite: bool
    ) -> None:
        self._roots = roots
        self.host_path = hp
        self._dirfd: int | None = dirfd
        self._tmp = tmp
        self._fd: int | None = fd
        self._overwrite = overwrite
        self.bytes_written = 0
        self.committed = False

    @property
    def path(self) -> str:
        return self.host_path.path

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the writer is closed")
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``; the number of bytes."""
        fd = self.fileno()
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(fd, view[done:])
        except OSError as exc:
            raise self._roots._error(exc, self.host_path) from None
        self.bytes_written += done
        return done

    def commit(self) -> None:
        """Make the file durable and rename it into place; on failure, abort and raise."""
        if self.committed:
            return
        fd, dirfd = self.fileno(), self._dirfd
        assert dirfd is not None
        hp = self.host_path
        name = hp.parts[-1]
        try:
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            if self._overwrite:
                # The target may have changed since the writer opened: still
                # never replace a directory, a link or a special file.
                self._roots._check_target(dirfd, name, hp, overwrite=True)
                os.rename(self._tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            else:
                _rename_noreplace(dirfd, self._tmp, name)
        except OSError as exc:
            self.abort()
            raise self._roots._error(exc, hp) from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        _fsync_dir(dirfd)
        os.close(dirfd)
        self._dirfd = None

    def abort(self) -> None:
        """Remove the temporary file; the target is left as it was."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dirfd is not None:
            if not self.committed:
                try:
                    os.unlink(self._tmp, dir_fd=self._dirfd)
                except FileNotFoundError:
                    pass
            os.close(self._dirfd)
            self._dirfd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit or abort must not leak its
        # descriptors or leave its temporary file behind.
        try:
            self.abort()
        except Exception:
            pass
