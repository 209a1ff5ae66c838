"""Helper configuration: a TOML file, every key optional.

A missing file means all defaults.  Unknown keys are an error, so a typo in
the operator's file is reported instead of silently ignored.
"""

from __future__ import annotations

import grp
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agentiso.protocol.types import NAME_PATTERN

from .errors import ConfigError
from .limits import LimitsConfig
from .net.config import NetConfig
from .storage.config import StorageConfig

DEFAULT_CONFIG_PATH = Path("/etc/agentiso/helper.toml")
DEFAULT_SOCKET_PATH = Path("/run/agentiso/helper.sock")


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    socket: str = str(DEFAULT_SOCKET_PATH)
    #: Group whose members may use the helper (besides root): a name or a gid.
    group: str | int = "agentiso"
    #: Who may do what: "group" (root and members of ``group``, for hosts
    #: without polkit) or "polkit" (the helper asks polkit for every action
    #: class, privhelper/polkit.py; polkit unreachable means refused).
    authorization: Literal["group", "polkit"] = "group"
    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o660
    #: Concurrent requests served per connection; more wait (backpressure).
    max_inflight_per_connection: Annotated[int, Meta(ge=1, le=4096)] = 64
    #: Connections of all non-root uids at once (root is never counted: it
    #: always gets a slot, so an operator can act during a flood).
    max_connections: Annotated[int, Meta(ge=1, le=65536)] = 1024
    #: Connections of one non-root uid at once.
    max_connections_per_uid: Annotated[int, Meta(ge=1, le=65536)] = 128
    #: Seconds a new connection has to say hello.
    hello_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    #: Seconds a connection may stay open with no request in flight and none
    #: sent (relayed guest channels excepted: their traffic is the guest's).
    idle_timeout_s: Annotated[float, Meta(gt=0, le=86400)] = 900.0
    #: Seconds a client may leave an answer (or relayed output) untaken
    #: before its connection is closed as not reading.
    send_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    #: Bytes (MiB) the helper may hold buffered for all non-root clients
    #: together (relay output queues, partial frames); see docs/helper.md.
    buffer_budget_mib: Annotated[int, Meta(ge=1, le=1 << 20)] = 512
    #: The share of ``buffer_budget_mib`` one non-root uid may hold.
    per_uid_buffer_mib: Annotated[int, Meta(ge=1, le=1 << 20)] = 128
    #: Output queued for one relayed client before it is judged not reading
    #: and dropped (at least two credit windows of a transfer).
    relay_queue_mib: Annotated[int, Meta(ge=1, le=4096)] = 32
    #: Requests of all relayed clients of one VM in flight at once (never more
    #: than the agent's own max_inflight less 8 kept for the helper's calls).
    relay_max_inflight_per_vm: Annotated[int, Meta(ge=1, le=65536)] = 256


class PathsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    state_dir: str = "/var/lib/agentiso"
    images_dir: str = "/var/lib/agentiso/images"


class TemplatesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[templates]``: boot templates (privhelper/vms/templates.py)."""

    #: Resume a ready template instead of booting when one fits the start.
    use: bool = True
    #: ``on-miss``: a start that found no template builds one in the
    #: background (one build per image and shape at a time), so the next
    #: create of that image and shape resumes instead of booting; ``off``:
    #: only an explicit build makes them.
    build: Literal["off", "on-miss"] = "on-miss"
    #: Clones map the template's RAM private copy-on-write (a sealed memfd
    #: the helper loads from the template's saved state, one per template
    #: and user) instead of each reading it into its own memory: unchanged
    #: pages are shared among one user's clones, never across users
    #: (docs/templates.md, "Memory sharing").  Changing it makes new
    #: templates (another key).
    share_memory: bool = True
    #: ``share_memory``: how long a user's copy of a template's RAM is kept
    #: after their last VM ended.  Making the copy costs that user's next
    #: create a read of the whole RAM (0.1-0.4 s for 256 MiB here); keeping
    #: it costs that much host memory meanwhile.  0: drop it at once.
    ram_keep_s: Annotated[float, Meta(ge=0, le=86400)] = 120.0


class PoolShape(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One ``[[pool.shapes]]`` entry: keep ``count`` VMs of this image and
    shape ready (the frontend's ``workspace_create`` defaults are 1 vCPU and
    256 MiB)."""

    #: The guest image of the pool's VMs.
    image: Annotated[str, Meta(pattern=NAME_PATTERN)] = "minimal"
    #: Their vCPUs: a ``VmStart`` of exactly this shape (and the image's
    #: default disk size) takes one over.
    vcpus: Annotated[int, Meta(ge=1, le=64)] = 1
    #: Their memory (MiB).
    memory_mib: Annotated[int, Meta(ge=64, le=1024 * 1024)] = 256
    #: How many are kept ready (within ``[pool] memory_mib``).
    count: Annotated[int, Meta(ge=0, le=64)] = 1


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[pool]``: the warm pool (privhelper/vms/pool.py; docs/templates.md).

    Each pool VM is resumed from its shape's boot template ahead of time and
    waits, warm, for a ``VmStart`` of that image and shape, which takes it
    over with a new identity instead of resuming the template then.  None by
    default: each costs its memory and a little CPU while it waits."""

    #: The shapes kept ready: ``[[pool.shapes]]`` tables of ``image``,
    #: ``vcpus``, ``memory_mib`` and ``count`` (two VMs of the default shape:
    #: a ``[[pool.shapes]]`` line, then ``count = 2``).
    shapes: list[PoolShape] = msgspec.field(default_factory=list)
    #: The pool's VMs together never hold more guest memory than this.
    memory_mib: Annotated[int, Meta(ge=0, le=2**30)] = 2048


class HelperConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    net: NetConfig = msgspec.field(default_factory=NetConfig)
    #: Boot templates (privhelper/vms/templates.py; docs/templates.md).
    templates: TemplatesConfig = msgspec.field(default_factory=TemplatesConfig)
    #: The warm pool (privhelper/vms/pool.py; docs/templates.md).
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    #: The VM engine's settings (privhelper.vm.engine.EngineSettings, without
    #: state_dir, which comes from [paths]); validated at start-up.
    vm: dict[str, object] = msgspec.field(default_factory=dict)


def parse_config(text: str, source: str = "<string>") -> HelperConfig:
    """Parse TOML text into a validated config (pure)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, HelperConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: Path) -> HelperConfig:
    """Read ``path``; a file that does not exist yields the defaults."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return HelperConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(path))


def resolve_gid(group: str | int) -> int | None:
    """The gid of the configured group, or None if no such group exists."""
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None
