"""The bounded values of the guest protocol's messages, and their base class.

Every message field is one of these (or a struct of them): names and paths
match anchored patterns (``\\A...\\Z``, so a trailing newline is refused),
sizes and counts have ranges.  :mod:`agentiso.protocol.guest` re-exports the
ones its users name.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .guest_constants import (
    MAX_CHUNK,
    MAX_INLINE_OUTPUT,
    MAX_WINDOW,
    SECRET_MAX_BYTES,
    SECRET_MIN_BYTES,
    KiB,
    MiB,
)
from .types import RequestId

# --- bounded scalar types --------------------------------------------------------------

#: An absolute guest path: no NUL (the kernel would cut it short), below PATH_MAX.
GuestPath = Annotated[str, Meta(min_length=1, max_length=4095, pattern=r"\A/[^\x00]*\Z")]
#: One argv element (MAX_ARG_STRLEN) without NUL.
Arg = Annotated[str, Meta(max_length=128 * KiB, pattern=r"\A[^\x00]*\Z")]
Argv = Annotated[list[Arg], Meta(min_length=1, max_length=4096)]
#: A shell command line for ``/bin/sh -c``.
ShellCommand = Annotated[str, Meta(min_length=1, max_length=128 * KiB, pattern=r"\A[^\x00]*\Z")]
EnvKey = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"\A[A-Za-z_][A-Za-z0-9_]*\Z")]
EnvValue = Annotated[str, Meta(max_length=32 * KiB, pattern=r"\A[^\x00]*\Z")]
Env = Annotated[dict[EnvKey, EnvValue], Meta(max_length=1024)]
EnvKeys = Annotated[list[EnvKey], Meta(max_length=1024)]
Stdin = Annotated[bytes, Meta(max_length=MAX_CHUNK)]
Chunk = Annotated[bytes, Meta(max_length=MAX_CHUNK)]
InlineOutput = Annotated[bytes, Meta(max_length=MAX_INLINE_OUTPUT)]
#: A deadline in seconds: positive, at most a day.
Timeout = Annotated[float, Meta(gt=0, le=86400)]
#: Seconds a long-poll may wait.
WaitSeconds = Annotated[float, Meta(ge=0, le=300)]
#: A byte offset or a byte count of a file or a stream (up to 1 PiB).
ByteCount = Annotated[int, Meta(ge=0, le=2**50)]
ChunkSize = Annotated[int, Meta(ge=4 * KiB, le=MAX_CHUNK)]
Window = Annotated[int, Meta(ge=1, le=MAX_WINDOW)]
Seq = Annotated[int, Meta(ge=0, le=2**62)]
#: Output cap per stream of a streaming exec.
StreamCap = Annotated[int, Meta(ge=0, le=2**50)]
Perm = Annotated[int, Meta(ge=0, le=0o7777)]
Signal = Annotated[int, Meta(ge=1, le=64)]
ExitCode = Annotated[int, Meta(ge=0, le=255)]
JobId = Annotated[int, Meta(ge=1, le=2**62)]
Pid = Annotated[int, Meta(ge=1, le=2**22)]
#: Ring buffer per job output stream.
RingSize = Annotated[int, Meta(ge=4 * KiB, le=16 * MiB)]
Sha256Hex = Annotated[str, Meta(pattern=r"\A[0-9a-f]{64}\Z")]
#: RFC 1123 host name (labels of letters, digits, inner dashes).
Hostname = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=253,
        pattern=r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z",
    ),
]
Mac = Annotated[str, Meta(pattern=r"\A[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")]
#: IPv4 or IPv6 address text; parsed by ``ipaddress`` in ``__post_init__``.
IpText = Annotated[str, Meta(min_length=2, max_length=45, pattern=r"\A[0-9a-fA-F.:]+\Z")]
IfName = Annotated[
    str, Meta(min_length=1, max_length=15, pattern=r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
]
DnsDomain = Annotated[str, Meta(min_length=1, max_length=253, pattern=r"\A[A-Za-z0-9.-]+\Z")]
FileName = Annotated[str, Meta(max_length=1024)]
RawName = Annotated[bytes, Meta(max_length=1024)]
SecretBytes = Annotated[bytes, Meta(min_length=SECRET_MIN_BYTES, max_length=SECRET_MAX_BYTES)]
Seconds = Annotated[float, Meta(ge=0, le=2**40)]
#: A systemd machine-id: 128 bits as 32 lower-case hex digits (never all zero).
MachineId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
#: Random bytes for the guest's kernel pool: at least 256 bits, at most 4 Kib.
Entropy = Annotated[bytes, Meta(min_length=32, max_length=512)]
#: Wall-clock time in nanoseconds since the epoch, 2000-01-01 .. 2200-01-01.
TimeNs = Annotated[int, Meta(ge=946_684_800 * 10**9, le=7_258_118_400 * 10**9)]
AutoThaw = Annotated[float, Meta(ge=1, le=600)]
ListLimit = Annotated[int, Meta(ge=1, le=100_000)]

OutputStream = Literal["stdout", "stderr"]
#: How FileWrite opens its file: ``truncate`` (create or replace contents),
#: ``create`` (must not exist), ``append`` (create or append), ``overwrite``
#: (must exist; write at ``offset`` without truncating).
WriteMode = Literal["truncate", "create", "append", "overwrite"]
FileKind = Literal["file", "dir", "symlink", "chardev", "blockdev", "fifo", "socket", "unknown"]


def check_ip(text: str, what: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} is not an IP address") from None


class Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    id: RequestId


