"""The only place the volume layer runs external commands.

A thin adapter over :func:`anyio.run_process`: argv only (never a shell), the C
locale so messages are parseable, a timeout, and a non-zero exit turned into
:class:`CommandFailed` carrying the command's stderr.  A missing program is
:class:`BackendUnavailable`; a command that failed because its filesystem is
full is :class:`~agentiso.privhelper.atomicfile.StateFilesystemFull`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from ..atomicfile import StateFilesystemFull
from .errors import BackendUnavailable, CommandFailed

_ENV_KEEP = ("PATH",)
#: strerror(ENOSPC) in the C locale the commands run in.
_NO_SPACE = "No space left on device"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C"
    return env


class Runner:
    """Runs argv lists with a per-command timeout (seconds)."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s

    async def run(self, argv: Sequence[str], *, check: bool = True) -> Result:
        """Run ``argv``; with ``check``, a non-zero exit raises CommandFailed."""
        try:
            with anyio.fail_after(self.timeout_s):
                proc = await anyio.run_process(
                    list(argv), check=False, env=_env(), stdin=subprocess.DEVNULL
                )
        except FileNotFoundError:
            raise BackendUnavailable(f"{argv[0]} is not installed") from None
        except TimeoutError:
            raise CommandFailed(
                argv, -int(signal.SIGKILL), f"timed out after {self.timeout_s} s"
            ) from None
        result = Result(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )
        if check and result.returncode != 0:
            if _NO_SPACE in result.stderr:
                raise StateFilesystemFull(f"running {' '.join(argv[:2])}")
            raise CommandFailed(argv, result.returncode, result.stderr or result.stdout)
        return result
