"""Messages between the host (helper or a test) and the in-VM agent.

Conversation (docs/guest-protocol.md has the full story)::

    channel opens (virtio-serial host side connects, or a vsock/unix connection)
    [vsock only] host -> Auth(id=0, secret)       (anything else: connection closed)
    agent -> GUEST_SYNC_MAGIC, Hello(id=0, version, boot timings, limits)  (unprompted)
    host  -> HOST_SYNC_MAGIC + nonce                          (raw, not a frame)
    agent -> GUEST_SYNC_MAGIC, Hello(id=0, ..., sync_nonce=nonce)
    then any number of requests, concurrently, each answered with its id.

Streams (exec output, downloads) are events that carry their request's id and a
sequence number ``seq`` counted from 1.  Flow control is by credit: the request
names a ``window``; the agent sends event ``seq`` only once the host has
acknowledged (``TransferAck``) every event up to ``seq - window``.  Uploads run
the other way: the host sends ``UploadChunk`` events, at most ``window`` ahead of
the agent's ``UploadAck``.  So neither side ever has to buffer more than
``window`` chunks of any one request, and a slow request never stalls the others.

Every struct forbids unknown fields; every field is bounded, so a decode either
yields an in-range message or fails with :class:`~agentiso.protocol.errors.DecodeError`.
Cross-field rules live in ``__post_init__`` (msgspec reports them as decode errors).
Messages *from* the guest are bounded too: a hostile guest cannot make the host
accept an unbounded list or string.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from . import guest_constants as _c
from . import guest_stream as _stream
from .codec import Codec
from .errors import ErrorCode
from .guest_system import ConfigureNetwork as ConfigureNetwork
from .guest_system import Reidentify as Reidentify
from .guest_system import SetHostname as SetHostname
from .guest_types import (
    Argv,
    AutoThaw,
    ByteCount,
    Chunk,
    ChunkSize,
    Env,
    EnvKeys,
    ExitCode,
    FileName,
    GuestPath,
    InlineOutput,
    JobId,
    ListLimit,
    Perm,
    Pid,
    RawName,
    RingSize,
    Seconds,
    SecretBytes,
    Seq,
    Sha256Hex,
    ShellCommand,
    Signal,
    Stdin,
    StreamCap,
    Timeout,
    WaitSeconds,
    Window,
)
from .guest_types import (
    FileKind as FileKind,
)
from .guest_types import (
    Msg as _Msg,
)
from .guest_types import (
    OutputStream as OutputStream,
)
from .guest_types import (
    WriteMode as WriteMode,
)
from .types import Label, ProtocolVersion, RequestId, ShortText

# The channel's constants and stream decoders live beside this module; they are
# re-exported because every user reads them as ``gp.NAME``.
AGENT_PORT_NAME = _c.AGENT_PORT_NAME
AGENT_VSOCK_PORT = _c.AGENT_VSOCK_PORT
AUTH_MAX_FRAME = _c.AUTH_MAX_FRAME
AUTH_TIMEOUT_S = _c.AUTH_TIMEOUT_S
DEFAULT_CHUNK = _c.DEFAULT_CHUNK
DEFAULT_MAX_INFLIGHT = _c.DEFAULT_MAX_INFLIGHT
GUEST_MAX_FRAME = _c.GUEST_MAX_FRAME
GUEST_PROTOCOL_VERSION = _c.GUEST_PROTOCOL_VERSION
GUEST_SYNC_MAGIC = _c.GUEST_SYNC_MAGIC
HOST_SYNC_MAGIC = _c.HOST_SYNC_MAGIC
MAX_CHUNK = _c.MAX_CHUNK
MAX_INLINE_OUTPUT = _c.MAX_INLINE_OUTPUT
MAX_WINDOW = _c.MAX_WINDOW
MAX_WINDOW_BYTES = _c.MAX_WINDOW_BYTES
SECRET_MAX_BYTES = _c.SECRET_MAX_BYTES
SECRET_MIN_BYTES = _c.SECRET_MIN_BYTES
SYNC_NONCE_LEN = _c.SYNC_NONCE_LEN
SYNC_RETRY_S = _c.SYNC_RETRY_S
GiB = _c.GiB
KiB = _c.KiB
MiB = _c.MiB
GuestStreamDecoder = _stream.GuestStreamDecoder
HostStreamDecoder = _stream.HostStreamDecoder
HostMarker = _stream.HostMarker

# --- requests (host -> guest) ------------------------------------------------------------


class _Command(_Msg):
    """What to run: exactly one of ``argv`` (no shell) or ``shell`` (``/bin/sh -c``)."""

    argv: Argv | None = None
    shell: ShellCommand | None = None
    cwd: GuestPath | None = None
    #: Added to (and overriding) the agent's environment defaults.
    env: Env = msgspec.field(default_factory=dict)
    stdin: Stdin = b""

    def _check_command(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("exactly one of argv and shell must be given")


class Auth(_Msg, tag="auth"):
    """First frame on vsock: the per-VM secret.  Not used on virtio-serial."""

    secret: SecretBytes


class Ping(_Msg, tag="ping"):
    pass


class Exec(_Command, tag="exec"):
    """Run a command to completion.

    Without ``stream`` the output comes back in :class:`ExecResult`, each stream
    capped at ``stdout_cap``/``stderr_cap`` (at most MAX_INLINE_OUTPUT); output
    past a cap is read and dropped (the command never blocks on a full pipe) and
    the ``*_truncated`` flag is set.  With ``stream`` the output comes as
    :class:`ExecOutput` events under credit ``window`` and the caps may be large.
    On timeout the whole process group is killed with SIGKILL.
    """

    timeout_s: Timeout = 600.0
    stdout_cap: StreamCap = MAX_INLINE_OUTPUT
    stderr_cap: StreamCap = MAX_INLINE_OUTPUT
    stream: bool = False
    window: Window = 16

    def __post_init__(self) -> None:
        self._check_command()
        if not self.stream and max(self.stdout_cap, self.stderr_cap) > MAX_INLINE_OUTPUT:
            raise ValueError(f"output caps above {MAX_INLINE_OUTPUT} need stream=true")


class JobStart(_Command, tag="job_start"):
    """Start a background job; output goes to a ring buffer per stream."""

    ring_bytes: RingSize = 1 * MiB
    #: Kill the job's process group after this long (None: never).
    timeout_s: Timeout | None = None

    def __post_init__(self) -> None:
        self._check_command()


class JobPoll(_Msg, tag="job_poll"):
    """Status and output from the given offsets (total bytes produced so far)."""

    job: JobId
    stdout_offset: ByteCount = 0
    stderr_offset: ByteCount = 0
    max_bytes: Annotated[int, Meta(ge=0, le=MAX_INLINE_OUTPUT)] = 256 * KiB
    #: Wait up to this long for new output or the job's end before answering.
    wait_s: WaitSeconds = 0.0


class JobKill(_Msg, tag="job_kill"):
    job: JobId
    signal: Signal = 15


class JobList(_Msg, tag="job_list"):
    pass


class JobForget(_Msg, tag="job_forget"):
    """Drop a finished job's record and output (a running job is refused)."""

    job: JobId


class FileRead(_Msg, tag="file_read"):
    path: GuestPath
    offset: ByteCount = 0
    length: Annotated[int, Meta(ge=0, le=MAX_CHUNK)] = MAX_CHUNK


class FileWrite(_Msg, tag="file_write"):
    path: GuestPath
    data: Chunk
    mode: WriteMode = "truncate"
    #: Only with mode ``overwrite``.
    offset: ByteCount = 0
    #: Permission bits for a newly created file (umask not applied).
    perm: Perm = 0o644
    #: Create missing parent directories (mode 0755).
    parents: bool = False

    def __post_init__(self) -> None:
        if self.offset and self.mode != "overwrite":
            raise ValueError("offset is only allowed with mode overwrite")


class FileStat(_Msg, tag="file_stat"):
    path: GuestPath
    follow_symlinks: bool = False


class ListDir(_Msg, tag="list_dir"):
    path: GuestPath
    limit: ListLimit = 10_000


class FileRemove(_Msg, tag="file_remove"):
    path: GuestPath
    #: Remove a directory and everything below it.
    recursive: bool = False
    #: Succeed when the path does not exist.
    missing_ok: bool = False


class MakeDir(_Msg, tag="make_dir"):
    path: GuestPath
    perm: Perm = 0o755
    parents: bool = False
    exist_ok: bool = False


class Download(_Msg, tag="download"):
    """Stream a guest file to the host as :class:`DownloadChunk` events, then
    :class:`DownloadEnd`.  ``length`` None: to the end of the file."""

    path: GuestPath
    offset: ByteCount = 0
    length: ByteCount | None = None
    chunk_size: ChunkSize = DEFAULT_CHUNK
    window: Window = 8

    def __post_init__(self) -> None:
        if self.window * self.chunk_size > MAX_WINDOW_BYTES:
            raise ValueError(f"window * chunk_size exceeds {MAX_WINDOW_BYTES}")


class TransferAck(_Msg, tag="transfer_ack"):
    """Host consumed every event of stream ``id`` up to ``seq``: credit returns."""

    seq: Seq


class UploadBegin(_Msg, tag="upload_begin"):
    """Start writing a guest file from :class:`UploadChunk` events.

    The data goes to a temporary file beside ``path`` that replaces ``path`` at
    :class:`UploadEnd` (atomic for readers); on any failure it is removed.
    """

    path: GuestPath
    perm: Perm = 0o644
    parents: bool = False
    #: Fail if ``path`` exists.
    exclusive: bool = False
    #: fsync the file before the rename.
    fsync: bool = False
    #: Chunks in flight; with chunks of up to MAX_CHUNK, bounds the agent's
    #: buffer to MAX_WINDOW_BYTES.
    window: Annotated[int, Meta(ge=1, le=MAX_WINDOW_BYTES // MAX_CHUNK)] = 8


class UploadChunk(_Msg, tag="upload_chunk"):
    seq: Annotated[int, Meta(ge=1, le=2**62)]
    data: Chunk


class UploadEnd(_Msg, tag="upload_end"):
    """No more chunks; ``chunks`` is the count sent, ``sha256`` (optional) the
    digest the agent must match before committing the file."""

    chunks: Seq
    sha256: Sha256Hex | None = None


class Cancel(_Msg, tag="cancel"):
    """Cancel in-flight request ``target``; it ends with Error(cancelled).
    Answered with Ok even when ``target`` is unknown (already finished)."""

    target: RequestId


class Sync(_Msg, tag="sync"):
    pass


class Freeze(_Msg, tag="freeze"):
    """sync, then FIFREEZE the root filesystem; thawed automatically after
    ``auto_thaw_s`` if no :class:`Thaw` arrives (a lost host cannot leave the
    guest frozen)."""

    auto_thaw_s: AutoThaw = 30.0


class Thaw(_Msg, tag="thaw"):
    pass


class SetEnv(_Msg, tag="set_env"):
    """Change the environment defaults of later execs and jobs."""

    set: Env = msgspec.field(default_factory=dict)
    unset: EnvKeys = msgspec.field(default_factory=list)
    #: Start from an empty default environment instead of the current one.
    replace: bool = False


class Shutdown(_Msg, tag="shutdown"):
    """Answered with Ok first; then the agent syncs and powers off (or reboots)."""

    reboot: bool = False


GuestRequest = (
    Auth
    | Ping
    | Exec
    | JobStart
    | JobPoll
    | JobKill
    | JobList
    | JobForget
    | FileRead
    | FileWrite
    | FileStat
    | ListDir
    | FileRemove
    | MakeDir
    | Download
    | TransferAck
    | UploadBegin
    | UploadChunk
    | UploadEnd
    | Cancel
    | SetHostname
    | ConfigureNetwork
    | Reidentify
    | Sync
    | Freeze
    | Thaw
    | SetEnv
    | Shutdown
)

#: Frames that continue a request already in flight rather than start one.
CONTINUATIONS: tuple[type[msgspec.Struct], ...] = (TransferAck, UploadChunk, UploadEnd)


# --- responses and events (guest -> host) -------------------------------------------------


class BootTimings(msgspec.Struct, forbid_unknown_fields=True):
    """Kernel uptime (seconds, /proc/uptime) at moments of the boot."""

    #: When /sbin/agentiso-init started (AGENTISO_INIT_T0), if known.
    init_t0: Seconds | None
    #: When the agent's Python code started.
    agent_start: Seconds
    #: When the agent's transport was ready.
    listen: Seconds
    #: When this Hello was sent.
    hello: Seconds


class Hello(_Msg, tag="hello"):
    version: ProtocolVersion
    agent: Label
    boot: BootTimings
    #: Which transport: "virtio-serial", "vsock", "unix", "socketpair".
    transport: Label
    max_frame: Annotated[int, Meta(ge=64 * KiB, le=64 * MiB)]
    max_chunk: Annotated[int, Meta(ge=4 * KiB, le=64 * MiB)]
    max_inflight: Annotated[int, Meta(ge=1, le=4096)]
    #: This Hello's number since the agent started (>1 after a reconnect).
    session: Annotated[int, Meta(ge=1, le=2**62)]
    #: Whether the agent is PID 1 in its VM.
    pid1: bool
    #: The nonce of the host sync marker this Hello answers (empty: unprompted).
    sync_nonce: Annotated[bytes, Meta(max_length=16)] = b""


class Pong(_Msg, tag="pong"):
    uptime_s: Seconds


class Ok(_Msg, tag="ok"):
    pass


class ExecOutput(_Msg, tag="exec_output"):
    seq: Seq
    stream: OutputStream
    data: Chunk


class ExecResult(_Msg, tag="exec_result"):
    """How an exec ended.  Exactly one of ``exit_code``/``signal`` is set."""

    exit_code: ExitCode | None
    signal: Signal | None
    timed_out: bool
    duration_s: Seconds
    #: Inline output (empty when streamed).
    stdout: InlineOutput = b""
    stderr: InlineOutput = b""
    #: Bytes the command wrote to each stream, including what the cap dropped.
    stdout_bytes: ByteCount = 0
    stderr_bytes: ByteCount = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class JobInfo(msgspec.Struct, forbid_unknown_fields=True):
    job: JobId
    pid: Pid
    #: A human summary of the command (truncated).
    command: Label
    running: bool
    exit_code: ExitCode | None = None
    signal: Signal | None = None
    timed_out: bool = False
    started_s: Seconds = 0.0
    ended_s: Seconds | None = None
    stdout_bytes: ByteCount = 0
    stderr_bytes: ByteCount = 0


class OutputSlice(msgspec.Struct, forbid_unknown_fields=True):
    """Output of one job stream from ``offset``.  ``lost`` bytes between the
    requested offset and ``offset`` were overwritten in the ring buffer;
    ``total`` is everything produced so far (the offset to poll from next when
    all of it was returned)."""

    offset: ByteCount
    data: InlineOutput
    lost: ByteCount
    total: ByteCount


class JobStarted(_Msg, tag="job_started"):
    job: JobId
    pid: Pid


class JobStatus(_Msg, tag="job_status"):
    info: JobInfo
    stdout: OutputSlice
    stderr: OutputSlice


class JobListing(_Msg, tag="job_listing"):
    jobs: Annotated[list[JobInfo], Meta(max_length=4096)]


class FileData(_Msg, tag="file_data"):
    data: Chunk
    #: True when the read reached the end of the file.
    eof: bool
    size: ByteCount


class FileWritten(_Msg, tag="file_written"):
    #: File size after the write.
    size: ByteCount


class StatInfo(msgspec.Struct, forbid_unknown_fields=True):
    kind: FileKind
    size: ByteCount
    perm: Perm
    uid: Annotated[int, Meta(ge=0, le=2**32 - 1)]
    gid: Annotated[int, Meta(ge=0, le=2**32 - 1)]
    mtime_ns: Annotated[int, Meta(ge=-(2**62), le=2**62)]
    symlink_target: Annotated[str, Meta(max_length=4095)] | None = None


class StatResult(_Msg, tag="stat_result"):
    stat: StatInfo


class DirEntry(msgspec.Struct, forbid_unknown_fields=True):
    #: The name (invalid UTF-8 replaced; then ``raw_name`` holds the bytes).
    name: FileName
    kind: FileKind
    size: ByteCount
    raw_name: RawName | None = None


class DirListing(_Msg, tag="dir_listing"):
    entries: Annotated[list[DirEntry], Meta(max_length=100_000)]
    #: More entries exist than ``limit``.
    truncated: bool


class DownloadChunk(_Msg, tag="download_chunk"):
    seq: Seq
    data: Chunk


class DownloadEnd(_Msg, tag="download_end"):
    size: ByteCount
    sha256: Sha256Hex


class UploadAck(_Msg, tag="upload_ack"):
    """Chunks up to ``seq`` are written; the host may send up to ``seq + window``."""

    seq: Seq


class UploadDone(_Msg, tag="upload_done"):
    size: ByteCount
    sha256: Sha256Hex


class Error(_Msg, tag="error"):
    """A typed failure of request ``id`` (0: of the connection as a whole)."""

    code: ErrorCode
    message: ShortText


GuestResponse = (
    Hello
    | Pong
    | Ok
    | ExecOutput
    | ExecResult
    | JobStarted
    | JobStatus
    | JobListing
    | FileData
    | FileWritten
    | StatResult
    | DirListing
    | DownloadChunk
    | DownloadEnd
    | UploadAck
    | UploadDone
    | Error
)

#: Events that are not the last message of their request.
STREAM_EVENTS: tuple[type[msgspec.Struct], ...] = (ExecOutput, DownloadChunk, UploadAck)

request_codec: Codec[GuestRequest] = Codec(GuestRequest)
response_codec: Codec[GuestResponse] = Codec(GuestResponse)
