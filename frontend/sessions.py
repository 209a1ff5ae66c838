"""Sessions: one per ``agentiso serve`` process, alive exactly while it runs.

A session is alive while its process holds an exclusive ``flock`` on the
session's lock file.  The kernel drops the lock when the process dies, however
it dies (``kill -9`` included), so liveness never depends on a pid that could
be reused.  Anyone can test it: taking the lock without blocking succeeds only
if the owner is gone.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

SESSIONS_DIR = "sessions"


def new_session_id() -> str:
    return "s-" + secrets.token_hex(6)


class Session:
    """Our own session: the lock is held until :meth:`close` or process exit."""

    def __init__(self, state_dir: Path, session_id: str | None = None) -> None:
        self.id = session_id or new_session_id()
        d = state_dir / SESSIONS_DIR
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = d / f"{self.id}.lock"
        self._fd: int | None = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def session_alive(state_dir: Path, session_id: str) -> bool:
    """Whether the process of ``session_id`` still runs (holds its lock)."""
    path = state_dir / SESSIONS_DIR / f"{session_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    # We got the lock: its owner is gone.  The stale file is removed.
    path.unlink(missing_ok=True)
    return False
