"""The structured results of the MCP tools (their output schemas).

Rules every model here follows, so that any spec-following MCP client can
check our results against the schemas (the TypeScript SDK does, formats
included):

* datetimes are timezone-aware UTC (a naive one fails ``date-time``);
* no field uses a JSON-Schema construct a strict validator could reject
  (no tuples, no ``bytes``; binary data is base64 text with its encoding named);
* every field has a description an agent can act on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WorkspaceState = Literal[
    "creating", "starting", "running", "stopping", "stopped", "crashed", "destroying"
]
Encoding = Literal["utf-8", "base64"]


def utc(ts: float) -> datetime:
    """A unix timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, tz=UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Forward(_Model):
    host_port: int = Field(description="Port on the host (reach it at 127.0.0.1:host_port)")
    guest_port: int = Field(description="Port inside the workspace")
    protocol: Literal["tcp", "udp"]
    external: bool = Field(default=False,
                           description="Reachable from other hosts too, not only this one")


class WorkspaceSummary(_Model):
    """One workspace, as listed."""

    id: str = Field(description="Stable id; any tool's `workspace` accepts it or the name")
    name: str
    state: WorkspaceState
    state_reason: str = Field(description="Why it is in this state (empty when unremarkable)")
    image: str
    vcpus: int
    memory_mb: int
    disk_gb: int | None = Field(description="Disk size asked for; null: the image's size")
    allow_internet: bool
    address: str | None = Field(description="IPv4 address on the workspace network, if running")
    created_at: datetime
    own_session: bool = Field(description="Created by this MCP session")


class Orphan(_Model):
    kind: Literal["vm", "volume"]
    name: str
    state: str


class WorkspaceList(_Model):
    workspaces: list[WorkspaceSummary]
    orphans: list[Orphan] = Field(
        description="Helper resources of yours that no workspace claims (e.g. left by a "
        "crash); `agentiso-helper gc` or a destroy of the same name removes them"
    )


class WorkspaceInfo(WorkspaceSummary):
    """One workspace in detail."""

    mac: str | None
    gateway: str | None
    disk_size_bytes: int | None = Field(description="Virtual disk size")
    disk_used_bytes: int | None = Field(description="Host space the disk takes")
    uptime_secs: float | None = Field(description="Seconds since the VM started, if running")
    forwards: list[Forward]
    snapshot_count: int
    accel: str | None = Field(description="Accelerator: kvm or tcg")
    env_keys: list[str] = Field(description="Default environment variables set with set_env")
    forked_from: str | None = Field(description="The workspace this one was forked from")
    forked_at_snapshot: str | None = Field(description="The snapshot it was forked from")
    idle_timeout_secs: int | None = Field(description="Stopped after this long unused")
    lifetime_secs: int | None = Field(description="Stopped this long after it starts")
    expires_at: datetime | None = Field(description="When a time limit fires if nothing "
                                        "happens from now on")


class Destroyed(_Model):
    id: str
    name: str
    destroyed: bool = True


class WorkspaceIp(_Model):
    workspace: str
    address: str
    prefix: int
    gateway: str
    mac: str


class WorkspaceLogs(_Model):
    workspace: str
    console: str = Field(description="The last lines of the VM's serial console")
    lines: int = Field(description="How many lines `console` holds")
    failure: str = Field(description="The helper's and the catalog's account of a failure, "
                         "if any (empty otherwise)")


class ExecResult(_Model):
    exit_code: int | None = Field(description="Exit status; null if killed by a signal")
    signal: int | None = Field(description="Signal that ended it, if any")
    timed_out: bool = Field(description="Killed (with its process group) at timeout_secs")
    duration_secs: float
    stdout: str
    stderr: str
    stdout_encoding: Encoding = Field(description="base64 when the output is not UTF-8 text")
    stderr_encoding: Encoding
    stdout_bytes: int = Field(description="Total bytes the command wrote to stdout")
    stderr_bytes: int
    stdout_truncated: bool = Field(description="stdout holds only the first bytes; the whole "
                                   "output is in stdout_file")
    stderr_truncated: bool
    stdout_file: str | None = Field(description="Guest file with the whole stdout, when "
                                    "truncated: read it with file_read")
    stderr_file: str | None


class JobStarted(_Model):
    workspace: str
    job: int = Field(description="Pass to exec_poll / exec_kill")
    pid: int


class JobPoll(_Model):
    job: int
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: str = Field(description="New stdout since the last poll")
    stderr: str
    stdout_encoding: Encoding
    stderr_encoding: Encoding
    stdout_offset: int = Field(description="Offset after this output; the next poll goes on "
                               "from here by default")
    stderr_offset: int
    stdout_lost_bytes: int = Field(description="Output dropped because the job's buffer "
                                   "overflowed before it was polled")
    stderr_lost_bytes: int


class JobKilled(_Model):
    job: int
    signal: int


class EnvResult(_Model):
    workspace: str
    env_keys: list[str] = Field(description="Variables now set for later execs (values are "
                                "not echoed)")


class FileContent(_Model):
    path: str
    content: str
    encoding: Encoding
    size: int = Field(description="File size in bytes")
    offset: int = Field(description="First line (text) or byte (base64) returned, from 0")
    count: int = Field(description="Lines (text) or bytes (base64) returned")
    has_more: bool = Field(description="More follows: call again with offset=next_offset")
    next_offset: int


class FileWritten(_Model):
    path: str
    bytes_written: int
    mode: str = Field(description="Permissions, octal")


class FileEdited(_Model):
    path: str
    replacements: int


class FileEntry(_Model):
    name: str
    kind: Literal["file", "dir", "symlink", "chardev", "blockdev", "fifo", "socket", "unknown"]
    size: int


class FileListing(_Model):
    path: str
    entries: list[FileEntry]
    truncated: bool = Field(description="More entries exist than were returned")


class Transfer(_Model):
    workspace: str
    guest_path: str
    host_path: str
    bytes: int
    sha256: str
    duration_secs: float


class Adopted(_Model):
    workspaces: list[WorkspaceSummary] = Field(description="Now owned by this session")


class AllowRule(_Model):
    cidr: str = Field(description="IPv4/IPv6 network, e.g. 192.0.2.0/24 or 203.0.113.7")
    ports: list[str] = Field(description="Ports or ranges ('443', '8000-8100'); empty: all")
    protocol: Literal["tcp", "udp", "any"]


class NetworkPolicyResult(_Model):
    workspace: str
    allow_internet: bool = Field(description="Outbound access (NAT) is on")
    allow: list[AllowRule] = Field(description="With allow_internet: only these (empty: all)")
    peers: list[str] = Field(description="Your workspaces this one may talk to (both ways)")
    groups: list[str] = Field(description="Workspaces of yours in a shared group may talk")
    forwards: list[Forward]
    applied: bool = Field(description="Applied to the running VM now (else at next start)")


class ForwardResult(_Model):
    workspace: str
    host_port: int = Field(description="Reach the guest port at 127.0.0.1:host_port")
    guest_port: int
    protocol: Literal["tcp", "udp"]
    external: bool = Field(description="Reachable from other hosts too, not only this one")


class SnapshotNode(_Model):
    name: str
    parent: str | None = Field(description="The snapshot this one was taken after")
    children: list[str]
    created_at: datetime
    description: str
    memory: bool = Field(description="A memory state was saved with it")
    size_bytes: int | None = Field(description="Host space it takes (null: unknown)")
    is_head: bool = Field(description="The workspace's current state descends from it")


class SnapshotTree(_Model):
    workspace: str
    head: str | None
    snapshots: list[SnapshotNode]


class SnapshotCreated(_Model):
    workspace: str
    name: str
    parent: str | None
    memory: bool
    created_at: datetime


class SnapshotRestored(_Model):
    workspace: str
    restored: str
    discarded: list[str] = Field(description="What the restore threw away")
    memory_restored: bool = Field(description="Processes were resumed from saved memory")
    state: WorkspaceState
    note: str


class SnapshotDeleted(_Model):
    workspace: str
    name: str
    deleted: bool = True


class ForkItem(_Model):
    name: str
    ok: bool
    id: str | None
    state: WorkspaceState | None
    address: str | None
    error: str | None = Field(description="Why this fork failed (nothing of it was kept)")


class ForkResult(_Model):
    source: str
    snapshot: str = Field(description="The snapshot the forks were made from")
    live: bool = Field(description="Forked with memory: running processes go on in each fork")
    forks: list[ForkItem]
    created: int
    failed: int
    note: str = Field(default="", description=(
        "Anything else to know, e.g. a snapshot kept although no fork was made"))
