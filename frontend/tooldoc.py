"""The tool reference (``docs/tools.md``), generated from the live tool schemas.

``python -m agentiso.frontend.tooldoc > docs/tools.md`` (or ``make docs``)
writes it; a unit test fails when the file and the server disagree, so the
reference cannot drift from what agents are offered.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import anyio

HEADER = """\
# Tool reference

Generated from the live schemas of `agentiso serve` by
`python -m agentiso.frontend.tooldoc` (`make docs`); a test fails when it is
stale. Every tool that acts on a workspace takes `workspace`: its name or id.
Every tool returns structured content matching its output schema; a failure is
a tool error of two lines: the cause, and what to do.
"""


def _type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    t = schema.get("type")
    if t == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if t == "object" and "additionalProperties" in schema:
        return f"map to {_type(schema['additionalProperties'])}"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    return str(t or "any")


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    for key, label in (("minimum", ">="), ("maximum", "<="), ("minLength", "length >="),
                       ("maxLength", "length <="), ("maxItems", "items <=")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    for sub in schema.get("anyOf", []):
        b = _bounds(sub)
        if b:
            parts.append(b)
    return ", ".join(parts)


def _description(schema: dict[str, Any]) -> str:
    if "description" in schema:
        return str(schema["description"])
    return next((str(sub["description"]) for sub in schema.get("anyOf", [])
                 if "description" in sub), "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(tools: list[Any]) -> str:
    """Markdown for ``tools`` (the SDK's Tool objects), in name order."""
    out = [HEADER]
    for t in sorted(tools, key=lambda t: t.name):
        a = t.annotations
        hints = [h for h, on in (("read-only", a and a.read_only_hint),
                                 ("destructive", a and a.destructive_hint),
                                 ("idempotent", a and a.idempotent_hint)) if on]
        out.append(f"\n## `{t.name}`\n\n{_cell(t.description or '')}\n")
        if hints:
            out.append(f"\n*{', '.join(hints)}*\n")
        props = t.input_schema.get("properties", {})
        required = set(t.input_schema.get("required", []))
        if props:
            out.append("\n| argument | type | required | default | notes |\n"
                       "|---|---|---|---|---|\n")
            for name, s in props.items():
                default = ("" if name in required or "default" not in s
                           else f"`{json.dumps(s['default'])}`")
                notes = "; ".join(x for x in (_cell(_description(s)), _bounds(s)) if x)
                out.append(f"| `{name}` | {_cell(_type(s))} | {'yes' if name in required else ''}"
                           f" | {default} | {notes} |\n")
        result = (t.output_schema or {}).get("properties", {})
        if result:
            out.append("\nReturns: " + ", ".join(f"`{k}`" for k in result) + ".\n")
    return "".join(out)


async def _tools() -> list[Any]:
    from .config import parse_config
    from .server import build_server

    with tempfile.TemporaryDirectory() as d:
        app = build_server(parse_config(f'state_dir = "{d}"\n'))
        return list(await app.list_tools())


def current() -> str:
    """The reference as the server describes its tools now."""
    return render(anyio.run(_tools))


if __name__ == "__main__":
    sys.stdout.write(current())
