"""Write /etc/agentiso/helper.toml from the helper's own config classes.

Every key of :class:`agentiso.privhelper.config.HelperConfig` (and of the
VM engine's settings, the ``[vm]`` table) is written commented out, with its
default and the ``#:`` comment that documents it in the code, so the file
cannot drift from what the helper accepts: a unit test parses it back.

``python scripts/helper_toml.py`` prints it.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import msgspec

from agentiso.privhelper.config import HelperConfig
from agentiso.privhelper.vm.engine.types import EngineSettings

HEADER = """\
# agentiso-helper configuration.  Every key is optional: the value shown is
# the default, and a key left commented keeps it.  Unknown keys are an error.
# Generated from the helper's code (scripts/helper_toml.py) by make install.
"""

_FIELD = re.compile(r"^\s+([a-z_][a-z0-9_]*)\s*:")
#: Set from elsewhere, not by the operator in this table.
_NOT_KEYS = {(EngineSettings, "state_dir")}


def field_docs(cls: type) -> dict[str, list[str]]:
    """The ``#:`` comment lines above each field of ``cls`` (pure over its source)."""
    docs: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _FIELD.match(line)
        if m:
            docs[m[1]] = pending
        pending = []
    return docs


def toml_value(name: str, value: Any) -> str | None:
    """``value`` as TOML, or None where TOML cannot say it (no null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return oct(value) if name.endswith("mode") else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        items = [toml_value(name, v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    raise TypeError(f"{name}: no TOML form for {type(value).__name__}")


def _table(cls: type[msgspec.Struct], instance: Any, path: str) -> list[str]:
    lines = [f"[{path}]"]
    sub: list[str] = []
    docs = field_docs(cls)
    for f in msgspec.structs.fields(cls):
        if (cls, f.name) in _NOT_KEYS:
            continue
        value = getattr(instance, f.name, f.default)
        if isinstance(value, msgspec.Struct):
            sub += ["", *_table(type(value), value, f"{path}.{f.name}")]
            continue
        for doc in docs.get(f.name, []):
            lines.append(f"# {doc}".rstrip())
        text = toml_value(f.name, value)
        if text is None:
            lines.append(f"# {f.name} =   (unset by default)")
        else:
            lines.append(f"# {f.name} = {text}")
    return lines + sub


def render() -> str:
    """The whole file (pure)."""
    out = [HEADER]
    default = HelperConfig()
    docs = field_docs(HelperConfig)
    for f in msgspec.structs.fields(HelperConfig):
        value = getattr(default, f.name)
        for doc in docs.get(f.name, []):
            out.append(f"# {doc}".rstrip())
        if f.name == "vm":
            engine = EngineSettings(state_dir="")
            out += _table(EngineSettings, engine, "vm")
        else:
            out += _table(type(value), value, f.name)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
