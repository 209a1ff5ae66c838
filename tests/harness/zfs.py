"""A real ZFS pool for tests: zfs-fuse's daemon and a pool on a sparse file.

There is no systemd here, so :func:`zfs_fuse_pool` starts ``zfs-fuse`` itself
(``--no-daemon`` as a child in its own session: its pid is the child's pid, no
pidfile race), waits until ``zpool list`` answers, creates a pool with a unique
name on a sparse file in a temporary directory, and on exit destroys the pool
and stops the daemon it started, by pid (TERM, then KILL after a grace period).
A daemon that was already running (someone else's) is used and left alone.

zfs-fuse talks to its tools over one fixed socket, so one daemon serves the
whole machine; pools are what tests keep apart.

Raises :class:`ZfsUnavailable` (tests turn it into ``pytest.skip``) when
zfs-fuse, /dev/fuse or root is missing.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class ZfsUnavailable(Exception):
    """zfs-fuse cannot run here; the message says why."""


@dataclass(frozen=True)
class ZfsPool:
    name: str
    vdev: Path
    mountpoint: Path
    #: Whether this harness started the daemon (and will stop it).
    own_daemon: bool

    @property
    def root(self) -> str:
        """The dataset the storage backend is configured with."""
        return f"{self.name}/agentiso"


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=_ENV, check=False
    )


def _daemon_answers() -> bool:
    try:
        return _run(["zpool", "list", "-H"], timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _check_available() -> None:
    if os.geteuid() != 0:
        raise ZfsUnavailable("zfs-fuse needs root")
    for tool in ("zfs-fuse", "zfs", "zpool"):
        if shutil.which(tool, path=_ENV["PATH"]) is None:
            raise ZfsUnavailable(f"{tool} is not installed (Debian package zfs-fuse)")
    if not os.path.exists("/dev/fuse"):
        raise ZfsUnavailable("/dev/fuse is missing")


def _start_daemon(workdir: Path) -> subprocess.Popen[bytes]:
    log = (workdir / "zfs-fuse.log").open("wb")
    try:
        proc = subprocess.Popen(
            ["zfs-fuse", "--no-daemon", "--no-kstat-mount"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_ENV,
        )
    finally:
        log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = (workdir / "zfs-fuse.log").read_text(errors="replace")[-500:]
            raise ZfsUnavailable(f"zfs-fuse exited with {proc.returncode}: {text}")
        if _daemon_answers():
            return proc
        time.sleep(0.1)
    _stop_daemon(proc)
    raise ZfsUnavailable("zfs-fuse did not answer within 20 s")


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        # zfs-fuse syncs and unmounts on TERM; that takes a few seconds.
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


#: Serialises harness users across processes (two engineers' test runs at once):
#: one run stopping the daemon it started must not pull it from under another.
_LOCK_PATH = Path(__file__).resolve().parents[2] / "build" / "zfs-harness.lock"
_LOCK_WAIT_S = 600


@contextmanager
def _harness_lock() -> Iterator[None]:
    _LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ZfsUnavailable(
                        "another test run kept the zfs-fuse harness busy"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


@contextmanager
def zfs_fuse_pool(workdir: Path, size: int = 4 * 1024**3) -> Iterator[ZfsPool]:
    """A fresh pool named ``agtest<hex>`` on a sparse file in ``workdir``."""
    _check_available()
    with _harness_lock():
        yield from _pool(workdir, size)


def _pool(workdir: Path, size: int) -> Iterator[ZfsPool]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = None if _daemon_answers() else _start_daemon(workdir)
    name = f"agtest{secrets.token_hex(4)}"
    vdev = workdir / f"{name}.vdev"
    mountpoint = workdir / "mnt"
    created = False
    try:
        with vdev.open("wb") as f:
            f.truncate(size)
        _shared_mountpoint(mountpoint)
        res = _run(["zpool", "create", "-m", str(mountpoint), name, str(vdev)])
        if res.returncode != 0:
            raise ZfsUnavailable(f"zpool create failed: {res.stderr.strip()}")
        created = True
        yield ZfsPool(name, vdev, mountpoint, own_daemon=proc is not None)
    finally:
        try:
            if created:
                res = _run(["zpool", "destroy", "-f", name])
                if res.returncode != 0:
                    # A busy mount (a test left a file open): wait a moment, retry once.
                    time.sleep(1)
                    _run(["zpool", "destroy", "-f", name])
        finally:
            if proc is not None:
                _stop_daemon(proc)
            _run(["umount", str(mountpoint)])
            vdev.unlink(missing_ok=True)


def _shared_mountpoint(mountpoint: Path) -> None:
    """Make ``mountpoint`` a shared mount, so that every dataset mounted below
    it is shared too.

    Without it, on a host whose ``/`` is private (this machine's is), a
    process that enters a new mount namespace while a dataset is mounted (the
    ``ip netns exec`` of a helper in another test part) keeps its own copy of
    that FUSE mount: zfs-fuse then calls the dataset busy until that process
    ends.  A shared mount's copy in such a namespace is its slave, so the
    unmount reaches it.  (On a systemd host ``/`` is shared already.)
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    for argv in (
        ["mount", "--bind", str(mountpoint), str(mountpoint)],
        ["mount", "--make-shared", str(mountpoint)],
    ):
        res = _run(argv)
        if res.returncode != 0:
            raise ZfsUnavailable(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def pool_datasets(pool: str) -> list[str]:
    """Every dataset and snapshot of ``pool`` (for "destroy leaves nothing" checks)."""
    res = _run(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", pool])
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return res.stdout.split()
