"""Spawning commands: argv/shell, cwd, environment, pipes, process groups.

Each command gets its own session (``setsid``), so its pid is its process
group id and ``killpg`` reaches its grandchildren too.  Exit statuses are
collected by the :class:`~agentiso.guest.reaper.Reaper`, never by Popen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode

from .errors import Failed, from_oserror
from .fdio import close_quietly, set_nonblocking, write_all
from .reaper import Reaper


def command_argv(cmd: gp.Exec | gp.JobStart) -> list[str]:
    if cmd.argv is not None:
        return list(cmd.argv)
    if cmd.shell is None:  # the decoder refuses this already; a request is not trusted
        raise Failed(ErrorCode.INVALID, "exactly one of argv and shell must be given")
    return ["/bin/sh", "-c", cmd.shell]


def command_summary(argv: list[str], limit: int = 256) -> str:
    text = " ".join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merged_env(defaults: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    env = dict(defaults)
    env.update(overrides)
    return env


@dataclass
class Child:
    pid: int
    stdout: int
    stderr: int
    exited: asyncio.Future[int]
    stdin_task: asyncio.Task[None] | None = None

    def killpg(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the command and what it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def close(self) -> None:
        close_quietly(self.stdout)
        close_quietly(self.stderr)
        self.stdout = self.stderr = -1
        if self.stdin_task is not None:
            self.stdin_task.cancel()


def spawn(
    argv: list[str],
    cwd: str | None,
    env: Mapping[str, str],
    stdin: bytes,
    reaper: Reaper,
) -> Child:
    """Start ``argv`` with piped stdout/stderr and ``stdin`` fed from memory
    (``/dev/null`` when empty).  Raises :class:`Failed` with a typed code."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r = in_w = None
    try:
        if stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=in_r if in_r is not None else subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            if cwd is not None and not os.path.isdir(cwd):
                raise Failed(ErrorCode.NOT_FOUND, f"cwd {cwd}: no such directory") from None
            raise Failed(ErrorCode.NOT_FOUND, f"{argv[0]}: command not found") from exc
        except PermissionError as exc:
            raise from_oserror(exc, argv[0]) from None
        except OSError as exc:
            raise from_oserror(exc, argv[0]) from None
    except BaseException:
        for fd in (out_r, err_r, in_w):
            close_quietly(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            close_quietly(fd)
    exited = reaper.watch(popen.pid)

    def settle(fut: asyncio.Future[int]) -> None:
        # Tell Popen the child is reaped, so it never waitpid()s that pid itself
        # (by then the pid may belong to another process).
        popen.returncode = fut.result() if not fut.cancelled() else 255

    exited.add_done_callback(settle)
    set_nonblocking(out_r)
    set_nonblocking(err_r)
    child = Child(popen.pid, out_r, err_r, exited)
    if in_w is not None:
        set_nonblocking(in_w)
        child.stdin_task = asyncio.get_running_loop().create_task(_feed(in_w, stdin))
    return child


async def _feed(fd: int, data: bytes) -> None:
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await write_all(fd, data)
    finally:
        close_quietly(fd)
