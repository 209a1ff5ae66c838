"""The configuration reference (``docs/configuration.md``), generated from the
config structs themselves.

    python scripts/configdoc.py > docs/configuration.md

Every key of the helper's ``helper.toml`` and of the user's ``config.toml``
is listed with its type and bounds (from the msgspec ``Meta`` constraints),
its default (from the struct), and its meaning (the ``#:`` comment above the
field in the source, or :data:`MEANINGS` for fields that have none).  A unit
test (tests/unit/test_configdoc.py) fails when the file is stale, so a key
added to a struct shows up here or the suite says so.

It lives outside both packages because it needs both: the frontend may not
import the helper.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import inspect as mi

#: Meanings of fields whose struct has no ``#:`` comment for them ("section.key").
MEANINGS: dict[str, str] = {
    "server.socket": "Path of the Unix socket the helper listens on (ignored under systemd "
                     "socket activation, where the .socket unit names it).",
    "server.socket_mode": "Mode the helper gives the socket it binds itself (octal in TOML: "
                          "0o660).",
    "server.max_connections": "Connections served at once; more are refused.",
    "storage.max_volume_bytes": "Largest volume size a request may ask for.",
    "storage.zfs.compression_fallback": "Compression used where the pool refuses "
                                        "``compression``.",
    "net.forward_port_min": "Lowest host port a port forward may use (ports below 1024 are "
                            "privileged).",
    "paths.state_dir": "The helper's state: registry, VM records and logs, IP pool, "
                       "qcow2 volumes, memory states.",
    "paths.images_dir": "Where built images live, one directory per image (vmlinuz, "
                        "initrd.img, rootfs.img, manifest.json).",
    "limits.per_uid_vms": "VMs one uid may hold (running or not).",
    "limits.per_uid_memory_mib": "MiB of VM memory one uid's VMs may have in total.",
    "limits.per_uid_disk_gib": "GiB of volume size (virtual, what they may grow to) per uid.",
    "limits.per_uid_volumes": "Volumes one uid may hold.",
    "limits.host_vms": "VMs on this host, all uids together.",
    "limits.host_memory_mib": "MiB of VM memory on this host, all uids together.",
    "limits.host_disk_gib": "GiB of volume size on this host, all uids together.",
    "storage.backend": '"qcow2" (needs only qemu-img) or "zfs" (needs an imported pool).',
    "net.bridge": "Name of the bridge every workspace TAP joins.",
    "net.subnet": "The workspace network; addresses are handed out from it.",
    "net.gateway": "The host's address on the bridge: the workspaces' gateway.",
    "vm.run_dir": "Per-VM private directories with QEMU's sockets. Keep it short: a Unix "
                  "socket path has at most 107 bytes. Must be traversable by other uids.",
    "vm.qemu_binary": "The QEMU system emulator to run (a name on PATH or a path).",
    "vm.uid_base": "First uid of the range each QEMU runs as (one uid, and the same gid, "
                   "per VM). No account may use the range.",
    "vm.uid_count": "How many uids the range has: at most this many VMs at once.",
    "vm.accel": '"auto": KVM when a test boot proves it works for the VM uids, else TCG; '
                '"kvm": KVM or fail; "tcg": never KVM.',
    "vm.console_max_bytes": "Size at which a VM's serial console log is cut (oldest half "
                            "dropped).",
    "vm.stderr_max_bytes": "Size at which QEMU's stderr log is cut.",
    "vm.console_tail_bytes": "Console tail kept in a crashed VM's reason.",
    "vm.qmp_timeout_s": "Seconds one QMP command may take.",
    "vm.start_timeout_s": "Seconds from QEMU's start to its QMP socket answering.",
    "vm.incoming_timeout_s": "Seconds a memory-state restore (migrate-incoming) may take.",
    "vm.probe_timeout_s": "Seconds the KVM test boot may take before KVM is judged unusable.",
    # The user's config.toml:
    "user.helper_socket": "The helper's socket.",
    "user.defaults.image": "Image a workspace is made from when workspace_create names none.",
    "user.defaults.vcpus": "vCPUs of a new workspace.",
    "user.defaults.memory_mb": "Memory (MB) of a new workspace.",
    "user.defaults.allow_internet": "Whether a new workspace may reach the internet.",
    "user.quotas.workspaces": "Workspaces of all your sessions together.",
    "user.quotas.workspaces_per_session": "Workspaces one session (one MCP client) may hold.",
    "user.quotas.vcpus": "vCPUs of your workspaces that are not stopped, all sessions.",
    "user.quotas.vcpus_per_session": "vCPUs of one session's workspaces that are not stopped.",
    "user.quotas.memory_mb": "Memory (MB) of your workspaces that are not stopped, all "
                             "sessions.",
    "user.quotas.memory_mb_per_session": "Memory (MB) of one session's workspaces that are "
                                         "not stopped.",
    "user.quotas.disk_gb": "Disk (GB) of all your workspaces.",
    "user.quotas.disk_gb_per_session": "Disk (GB) of one session's workspaces.",
    "user.quotas.snapshots_per_workspace": "Snapshots one workspace may have.",
    "user.quotas.forks_per_call": "Most forks one workspace_fork call may make.",
}

HEADER = """\
# Configuration reference

Generated from the configuration structs by `python scripts/configdoc.py >
docs/configuration.md`; a unit test fails when it is stale. Every key is
optional (a missing file means all defaults) and unknown keys are an error, so
a typo is reported instead of ignored. Sizes are bytes unless the key says
otherwise (`_mib`, `_gib`, `_mb`, `_gb`); durations are seconds (`_s`,
`_secs`).

- [Helper: `/etc/agentiso/helper.toml`](#helper-etcagentisohelpertoml)
- [User: `config.toml`](#user-configtoml)
"""

HELPER_INTRO = """\
## Helper: `/etc/agentiso/helper.toml`

Read by `agentiso-helper serve` and `agentiso-helper check` (`--config PATH`
to use another file). Owned by root; changes take effect when the helper
restarts (running VMs are kept: see [operations](operations.md)). Per-uid
limits here are the hard security limits; the user's quotas below are for
sessions.
"""

USER_INTRO = """\
## User: `config.toml`

Each user's own file, in their config directory
(`~/.config/agentiso/config.toml`, or `--config PATH`). Read by `agentiso
serve`, `status`, `list` and `doctor`. Paths may start with `~/`.
"""


@dataclass(frozen=True)
class Key:
    name: str
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines right above each field of a class's source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for raw in src.splitlines()[1:]:
        line = raw.strip()
        if line.startswith("#:"):
            pending.append(line[2:].strip())
            continue
        m = re.match(r"([a-z_][a-z0-9_]*)\s*:", line)
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        if line:
            pending = []
    return out


def _type(t: mi.Type) -> str:
    if isinstance(t, mi.UnionType):
        return " or ".join(_type(x) for x in t.types)
    if isinstance(t, mi.LiteralType):
        return " \\| ".join(f'`"{v}"`' if isinstance(v, str) else f"`{v}`" for v in t.values)
    if isinstance(t, mi.NoneType):
        return "none (omit)"
    if isinstance(t, mi.IntType | mi.FloatType):
        name = "integer" if isinstance(t, mi.IntType) else "number"
        lo = f">= {t.ge}" if t.ge is not None else (f"> {t.gt}" if t.gt is not None else "")
        hi = f"<= {t.le}" if t.le is not None else (f"< {t.lt}" if t.lt is not None else "")
        bounds = ", ".join(b for b in (lo, hi) if b)
        return f"{name} ({bounds})" if bounds else name
    if isinstance(t, mi.StrType):
        extra = []
        if t.pattern:
            extra.append(f"pattern `{t.pattern}`")
        if t.max_length is not None:
            extra.append(f"at most {t.max_length} chars")
        return "string" + (f" ({', '.join(extra)})" if extra else "")
    if isinstance(t, mi.BoolType):
        return "boolean"
    if isinstance(t, mi.ListType | mi.VarTupleType):
        n = f", at most {t.max_length}" if t.max_length is not None else ""
        return f"list of {_type(t.item_type)}{n}"
    if isinstance(t, mi.TupleType):
        return f"list of {len(t.item_types)}: " + ", ".join(_type(x) for x in t.item_types)
    return type(t).__name__.removesuffix("Type").lower()


def _default(f: mi.Field) -> str:
    if f.name.endswith("_mode") and isinstance(f.default, int):
        return f"`0o{f.default:o}`"
    if f.default is not msgspec.NODEFAULT:
        value: Any = f.default
    elif f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        value = list(value)
    text = f"`{msgspec.json.encode(value).decode()}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20 \
            and f.name.endswith("bytes"):
        text += f" ({_human(value)})"
    return text


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def _prose(text: str) -> str:
    """One line of Markdown from a source comment or docstring."""
    return " ".join(text.split()).replace("``", "`")


def keys_of(cls: type, section: str, skip: tuple[str, ...] = (), ns: str = ""
            ) -> tuple[list[Key], list[tuple[str, type, bool]]]:
    """The scalar keys of a struct, and its sub-tables (name, struct, whether
    an array of tables, ``[[...]]``) to list apart."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    comments = field_comments(cls)
    keys, tables = [], []
    for f in info.fields:
        if f.name in skip:
            continue
        if isinstance(f.type, mi.StructType):
            tables.append((f.name, f.type.cls, False))
            continue
        if isinstance(f.type, mi.ListType) and isinstance(f.type.item_type, mi.StructType):
            tables.append((f.name, f.type.item_type.cls, True))  # and listed as a key
        if isinstance(f.type, mi.DictType):
            continue  # a free-form table documented by its own struct (e.g. [vm])
        dotted = f"{section}.{f.name}" if section else f.name
        meaning = comments.get(f.name) or MEANINGS.get(ns + dotted, "")
        keys.append(Key(f.name, _type(f.type), _default(f), _prose(meaning)))
    return keys, tables


def table(title: str, doc: str, keys: list[Key]) -> str:
    out = [f"### `{title}`" if title else "### Top-level keys", ""]
    if doc:
        out += [doc, ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in keys:
        meaning = k.meaning.replace("|", "\\|") or "(undocumented)"
        out.append(f"| `{k.name}` | {k.type} | {k.default} | {meaning} |")
    return "\n".join(out) + "\n"


def _class_doc(cls: type) -> str:
    # A struct's own docstring only, not msgspec.Struct's.
    doc = cls.__dict__.get("__doc__") or ""
    return _prose(inspect.cleandoc(doc).split("\n\n")[0]) if doc else ""


def sections(cls: type, prefix: str, extra: dict[str, type] | None = None,
             skip: tuple[str, ...] = (), ns: str = "", array: bool = False) -> list[str]:
    """Markdown for a struct and, depth first, its sub-tables (``ns``: the
    :data:`MEANINGS` namespace, "user." for the user's file; ``array``: an
    array of tables, ``[[prefix]]``)."""
    keys, tables = keys_of(cls, prefix, skip, ns)
    title = (f"[[{prefix}]]" if array else f"[{prefix}]") if prefix else ""
    out = [table(title, _class_doc(cls) if prefix else "", keys)] if keys else []
    for name, sub, is_array in [*tables, *((n, c, False) for n, c in (extra or {}).items())]:
        dotted = f"{prefix}.{name}" if prefix else name
        out += sections(sub, dotted, skip=("state_dir",) if name == "vm" else (), ns=ns,
                        array=is_array)
    return out


def current() -> str:
    """The reference as it should be for the code as it is."""
    from agentiso.frontend.config import FileConfig
    from agentiso.privhelper.config import HelperConfig
    from agentiso.privhelper.vm.engine.types import EngineSettings

    helper = sections(HelperConfig, "", extra={"vm": EngineSettings})
    vm_note = ("The `[vm]` table is the VM engine's settings; `state_dir` is not set "
               "here but taken from `[paths] state_dir`.\n")
    user = sections(FileConfig, "", ns="user.")
    return "\n".join([HEADER, HELPER_INTRO, *helper, vm_note, USER_INTRO, *user]).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(current())
