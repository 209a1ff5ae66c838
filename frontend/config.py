"""The user's frontend configuration: ``config.toml`` in the user's config dir.

Every key is optional; a missing file means all defaults.  Unknown keys are an
error, so a typo is reported instead of silently ignored.  Example::

    helper_socket = "/run/agentiso/helper.sock"
    host_roots = ["~/projects", "/tmp/agentiso"]   # where file_upload/download may go

    [defaults]          # what workspace_create uses when an argument is omitted
    image = "minimal"
    vcpus = 1
    memory_mb = 256

    [limits]            # bounds on tool arguments (the helper has its own, per uid)
    max_exec_timeout_secs = 3600

    [quotas]            # what you (all sessions) and one session may hold
    workspaces = 32
    memory_mb_per_session = 32768

The parsing is pure (:func:`parse_config`); :func:`load_config` reads the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
import platformdirs
from msgspec import Meta

from .errors import FrontendError

DEFAULT_HELPER_SOCKET = "/run/agentiso/helper.sock"
APP_NAME = "agentiso"


class ConfigError(FrontendError):
    """The user's config file is unreadable or invalid."""


class Defaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    image: Annotated[str, Meta(pattern=r"\A[a-z0-9][a-z0-9-]{0,62}\Z")] = "minimal"
    vcpus: Annotated[int, Meta(ge=1, le=64)] = 1
    memory_mb: Annotated[int, Meta(ge=64, le=1024 * 1024)] = 256
    #: None keeps the image's own disk size.
    disk_gb: Annotated[int, Meta(ge=1, le=16 * 1024)] | None = None
    allow_internet: bool = False


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: Longest ``timeout_secs`` an exec may ask for.
    max_exec_timeout_secs: Annotated[int, Meta(ge=1, le=24 * 3600)] = 3600
    #: Output an exec result carries inline, per stream; the rest goes to a guest file.
    exec_output_cap_bytes: Annotated[int, Meta(ge=1024, le=4 * 1024 * 1024)] = 256 * 1024
    #: Most of one stream's output kept in the guest file past the cap.
    exec_spill_max_bytes: Annotated[int, Meta(ge=0, le=1 << 40)] = 1 << 30
    #: Largest file_read / file_write content carried inline in one call.
    max_inline_file_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 4 * 1024 * 1024
    #: How long a workspace boot may take before create/start gives up.
    boot_timeout_secs: Annotated[int, Meta(ge=10, le=3600)] = 180
    #: Most workspaces one exec_parallel call may name.
    max_parallel_workspaces: Annotated[int, Meta(ge=1, le=1000)] = 20
    #: How many of an exec_parallel's commands run at once.
    exec_parallelism: Annotated[int, Meta(ge=1, le=256)] = 8
    #: Inline output per stream of each exec_parallel result.
    exec_parallel_output_cap_bytes: Annotated[int, Meta(ge=1024, le=4 * 1024 * 1024)] = 64 * 1024
    #: Let git_clone (and workspace_prepare) use file:// URLs (for tests; off: a
    #: file URL reads the workspace's own files as if they were a remote).
    git_allow_file_urls: bool = False
    #: Default time limit of a clone or a push (their timeout_secs overrides it).
    git_network_timeout_secs: Annotated[int, Meta(ge=5, le=24 * 3600)] = 600


Count = Annotated[int, Meta(ge=0, le=1 << 20)]


class Quotas(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What one user (all their sessions) and one session may hold.  Checked
    before anything is made; the helper's per-uid limits stay the hard floor.
    vCPUs and memory count workspaces that are not stopped; workspaces and
    disk count every workspace."""

    workspaces: Count = 32
    workspaces_per_session: Count = 16
    vcpus: Count = 64
    vcpus_per_session: Count = 32
    memory_mb: Count = 64 * 1024
    memory_mb_per_session: Count = 32 * 1024
    disk_gb: Count = 2048
    disk_gb_per_session: Count = 1024
    snapshots_per_workspace: Count = 64
    forks_per_call: Annotated[int, Meta(ge=1, le=1000)] = 20


class FileConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The file's schema (paths are strings here; :class:`FrontendConfig` resolves them)."""

    helper_socket: str = DEFAULT_HELPER_SOCKET
    #: Host directories file_upload/file_download may read from and write to.
    #: None: the directory ``agentiso serve`` was started in (an MCP client starts
    #: it in the project's directory), unless that is ``/``.
    host_roots: Annotated[list[str], Meta(max_length=64)] | None = None
    #: Where the catalog lives; default: the user's state dir.
    state_dir: str | None = None
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    limits: Limits = msgspec.field(default_factory=Limits)
    quotas: Quotas = msgspec.field(default_factory=Quotas)


class FrontendConfig(msgspec.Struct, frozen=True):
    """The resolved configuration the server runs with."""

    helper_socket: str
    host_roots: tuple[Path, ...]
    state_dir: Path
    defaults: Defaults
    limits: Limits
    quotas: Quotas
    #: Where it was read from (None: defaults only), for messages.
    source: str | None = None


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def parse_config(
    text: str, *, source: str = "<string>", cwd: Path | None = None, home: Path | None = None
) -> FrontendConfig:
    """Parse TOML text into a resolved config (pure: ``cwd`` and ``home`` are given)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}\nFix the file or remove it.") from None
    try:
        fc = msgspec.convert(raw, FileConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}\nFix that key (every key is optional).") from None
    home = home or Path.home()
    cwd = cwd or Path("/")

    def resolve(p: str, what: str) -> Path:
        path = home / p[2:] if p == "~" or p.startswith("~/") else Path(p)
        if not path.is_absolute():
            raise ConfigError(f"{source}: {what} {p!r} is not an absolute path\n"
                              "Write it absolute, or starting with '~/'.")
        return path

    if fc.host_roots is None:
        roots: tuple[Path, ...] = () if cwd == Path("/") else (cwd,)
    else:
        roots = tuple(resolve(r, "host root") for r in fc.host_roots)
    state = (resolve(fc.state_dir, "state_dir") if fc.state_dir
             else Path(platformdirs.user_state_dir(APP_NAME)))
    return FrontendConfig(
        helper_socket=fc.helper_socket, host_roots=roots, state_dir=state,
        defaults=fc.defaults, limits=fc.limits, quotas=fc.quotas, source=source,
    )


def load_config(path: Path | None = None, *, helper_socket: str | None = None) -> FrontendConfig:
    """Read ``path`` (default: the user's ``config.toml``; a missing default file
    means all defaults, a missing explicit one is an error)."""
    explicit = path is not None
    path = path or default_config_path()
    try:
        text = path.read_text()
        source: str | None = str(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist\n"
                              "Create it, or drop --config to use the defaults.") from None
        text, source = "", None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}\nCheck its permissions.") from None
    cfg = parse_config(text, source=source or "<defaults>", cwd=Path.cwd())
    if source is None:
        cfg = msgspec.structs.replace(cfg, source=None)
    if helper_socket is not None:
        cfg = msgspec.structs.replace(cfg, helper_socket=helper_socket)
    return cfg
