"""Running a command in a workspace for the ``exec`` tool.

The command's output is streamed from the guest (the agent's credit window
bounds what is in flight).  Per stream, the first ``cap`` bytes are kept for
the result; once a stream passes its cap, everything it wrote (the kept head,
then the rest as it comes) is also written to a guest file whose path the
result names, so the agent can read the rest with ``file_read``.  Memory stays
bounded by the cap plus a few chunks, whatever the command prints.

Each chunk is also handed to ``on_output`` (the MCP server turns it into a
progress notification).  Cancelling the call cancels the guest request, and
the agent kills the command's whole process group.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from agentiso.protocol import errors as pe

from .guest_client import ExecOutcome, GuestClient
from .results import Encoding, ExecResult

log = structlog.get_logger("agentiso.frontend.execution")

#: Where the whole output of a truncated stream is kept in the guest: on its
#: disk (/tmp is RAM in the guest images), removed at the next boot.
SPILL_DIR = "/var/tmp/agentiso-output"
#: No stream cap for the agent: the frontend caps (and spills) itself.
UNCAPPED = 2**50
OnOutput = Callable[[str, bytes, int], Awaitable[None]]


#: Words a plain command may consist of to skip the shell: nothing /bin/sh would
#: expand, quote, redirect, glob or treat as a comment.
_PLAIN_WORD = re.compile(r"\A[A-Za-z0-9_./:,+@%=-]+\Z")
#: First words that must go through the shell: its keywords, and builtins that
#: behave differently from (or do not exist as) a program.  ``true``, ``false``,
#: ``test`` and ``[`` behave the same either way and keep the fast path.
_SHELL_WORDS = frozenset({
    ".", ":", "alias", "bg", "break", "case", "cd", "command", "continue", "do", "done",
    "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "fc", "fg", "fi", "for",
    "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf", "pwd", "read",
    "readonly", "return", "select", "set", "shift", "source", "then", "time", "times", "trap",
    "type", "ulimit", "umask", "unalias", "unset", "until", "wait", "while", "function"
})


def plain_argv(command: str) -> list[str] | None:
    """The argv of a command line the shell would only split on blanks
    (``git status``, ``python3 -m pytest -q``), else None.  Running such a
    command without ``/bin/sh -c`` behaves the same and saves starting a
    shell (several ms under TCG)."""
    words = command.split()
    if not words or len(command) > 4096 or any(c in command for c in "\n\r\v\f"):
        return None
    if not all(_PLAIN_WORD.match(w) for w in words):
        return None
    first = words[0]
    if first in _SHELL_WORDS or "=" in first:
        return None
    return words


def decode_output(data: bytes, truncated: bool = False) -> tuple[str, Encoding]:
    """UTF-8 text when it is text, else base64 (lossless either way).  A
    multi-byte character cut by truncation does not make text binary."""
    text, encoding, _ = decode_prefix(data, truncated)
    return text, encoding


def decode_prefix(data: bytes, cut: bool) -> tuple[str, Encoding, int]:
    """:func:`decode_output` and how many bytes of ``data`` it stands for: with
    ``cut``, a character split at the end is left out (and not counted), so
    a reader going on from ``offset + used`` gets it whole next time."""
    try:
        return data.decode("utf-8"), "utf-8", len(data)
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            try:
                return data[: exc.start].decode("utf-8"), "utf-8", exc.start
            except UnicodeDecodeError:
                pass
    return base64.b64encode(data).decode("ascii"), "base64", len(data)


@dataclass
class _Capture:
    """One output stream: its kept head and, past the cap, its spill upload."""

    name: str
    cap: int
    #: Most bytes the guest file may take; past it the rest is not kept.
    spill_max: int = 1 << 30
    head: bytearray = field(default_factory=bytearray)
    total: int = 0
    spill_path: str | None = None
    spill_failed: str | None = None
    spill_cut: bool = False
    _send: MemoryObjectSendStream[bytes] | None = None

    async def add(self, data: bytes, guest: GuestClient, tg: anyio.abc.TaskGroup,
                  run_id: str) -> None:
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
        if self.total <= self.cap or self.spill_failed is not None or self.spill_cut:
            return
        if self._send is None:
            self.spill_path = f"{SPILL_DIR}/{run_id}.{self.name}"
            send, recv = anyio.create_memory_object_stream[bytes](4)
            self._send = send

            async def chunks() -> AsyncIterator[bytes]:
                async with recv:
                    async for item in recv:
                        yield item

            tg.start_soon(self._upload, guest, chunks())
            # Everything written so far: the head, then the part of this chunk past it.
            await self._put(bytes(self.head))
            data = data[max(room, 0):]
        if data and self._send is not None:
            room_in_file = self.spill_max - (self.total - len(data))
            if room_in_file <= 0:
                self.finish()  # the file holds what the cap allows
                self.spill_cut = True
                return
            if len(data) > room_in_file:
                data = data[:room_in_file]
                self.spill_cut = True
            await self._put(data)

    async def _put(self, data: bytes) -> None:
        if self._send is None:
            return
        for i in range(0, len(data), 256 * 1024):
            try:
                await self._send.send(data[i : i + 256 * 1024])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._send = None  # the upload failed; the output is still read
                return

    async def _upload(self, guest: GuestClient, chunks: AsyncIterator[bytes]) -> None:
        try:
            await guest.upload(str(self.spill_path), chunks, parents=True, perm=0o600)
        except Exception as exc:
            self.spill_failed = str(exc)
            log.warning("spill_failed", path=self.spill_path, error=str(exc))

    def finish(self) -> None:
        if self._send is not None:
            self._send.close()
            self._send = None


async def _exec(guest: GuestClient, command: str, **kw: Any) -> ExecOutcome:
    """Run ``command``: straight as an argv when it is plain, else with the shell."""
    argv = plain_argv(command)
    if argv is not None:
        try:
            return await guest.exec(argv, **kw)
        except (pe.NotFound, pe.PermissionDenied, pe.InvalidRequest):
            # Refused before it started (no such program, a script without a
            # shebang, a bad cwd, ...): let the
            # shell run it, so the result is the shell's (exit 127, its message).
            pass
    return await guest.exec(shell=command, **kw)


async def run_exec(
    guest: GuestClient,
    *,
    command: str,
    workdir: str | None,
    env: dict[str, str],
    timeout_s: float,
    stdin: bytes,
    cap: int,
    spill_max: int = 1 << 30,
    on_output: OnOutput | None = None,
) -> ExecResult:
    """Run ``command`` with ``/bin/sh -c`` and collect its result."""
    run_id = secrets.token_hex(6)
    out = _Capture("stdout", cap, spill_max)
    err = _Capture("stderr", cap, spill_max)
    # The spill uploads run beside the command.  Whatever the command's
    # call raises is taken out of the task group and raised as itself (a task
    # group would wrap it in an ExceptionGroup, hiding its type from callers).
    error: BaseException | None = None
    outcome: ExecOutcome | None = None
    async with anyio.create_task_group() as tg:

        async def collect(stream: str, data: bytes) -> None:
            capture = out if stream == "stdout" else err
            await capture.add(data, guest, tg, run_id)
            if on_output is not None:
                await on_output(stream, data, out.total + err.total)

        try:
            outcome = await _exec(
                guest, command, cwd=workdir, env=env, stdin=stdin, timeout_s=timeout_s,
                stdout_cap=UNCAPPED, stderr_cap=UNCAPPED, on_output=collect,
            )
        except BaseException as exc:
            error = exc
            tg.cancel_scope.cancel()
        finally:
            out.finish()
            err.finish()
    if error is not None:
        raise error
    if outcome is None:  # pragma: no cover - _exec returns or raises
        raise RuntimeError("exec ended without an outcome")
    results = {}
    for c in (out, err):
        truncated = c.total > c.cap
        text, enc = decode_output(bytes(c.head), truncated)
        spilled = c.spill_path if truncated and c.spill_failed is None else None
        results[c.name] = (text, enc, truncated, spilled)
    return ExecResult(
        exit_code=outcome.exit_code, signal=outcome.signal, timed_out=outcome.timed_out,
        duration_secs=round(outcome.duration_s, 6),
        stdout=results["stdout"][0], stderr=results["stderr"][0],
        stdout_encoding=results["stdout"][1], stderr_encoding=results["stderr"][1],
        stdout_bytes=out.total, stderr_bytes=err.total,
        stdout_truncated=results["stdout"][2], stderr_truncated=results["stderr"][2],
        stdout_file=results["stdout"][3], stderr_file=results["stderr"][3],
    )
