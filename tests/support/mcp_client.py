"""Drive ``agentiso serve`` the way an agent's MCP client does.

The server runs as a subprocess over stdio, started by the real client of
the ``mcp`` package.  :class:`Tools` calls tools and checks every result the
way a strict client would: a structured result that does not validate against
its tool's output schema (formats included, e.g. ``date-time``) fails the
test, and so does a success without structured content.

An unprivileged server gets a world-readable copy of everything it imports
(the checkout and the venv may sit where other uids cannot go), made once per
test run with :func:`public_frontend_runtime`.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.support.helper_process import REPO, public_tmpdir

_RUNTIME: Path | None = None
#: Not needed to run the server, and large.
_SKIP = {"mypy", "mypyc", "pip", "setuptools", "hypothesis", "_pytest", "pytest", "ruff",
         "pyroute2", "qemu", "__pycache__"}


def public_frontend_runtime() -> Path:
    """A directory any uid may read holding ``agentiso.protocol``,
    ``agentiso.frontend`` and the venv's packages; removed at exit."""
    global _RUNTIME
    if _RUNTIME is None:
        d = public_tmpdir("agentiso-serve-rt-")
        site = Path(next(p for p in sys.path if p.endswith("site-packages")))
        ignore = shutil.ignore_patterns("__pycache__")
        for name in ("protocol", "frontend"):
            shutil.copytree(REPO / name, d / "agentiso" / name, ignore=ignore)
        for entry in site.iterdir():
            if entry.name in _SKIP or "mypyc" in entry.name or entry.name.startswith(
                    ("__editable__", "_agentiso", "agentiso", "mypy")):
                continue
            if entry.suffix == ".pth":
                continue
            if entry.is_dir():
                shutil.copytree(entry, d / entry.name, ignore=ignore, symlinks=True)
            else:
                shutil.copy2(entry, d / entry.name)
        for path in [d, *d.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        atexit.register(shutil.rmtree, d, True)
        _RUNTIME = d
    return _RUNTIME


def serve_params(config: Path, *, uid: int | None = None, gid: int | None = None,
                 groups: tuple[int, ...] = (), home: Path | None = None) -> StdioServerParameters:
    """``agentiso serve --config CONFIG``, as root (the venv's interpreter) or
    as ``uid`` with exactly ``groups`` (the base interpreter on the public copy)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home or "/"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    serve = ["-m", "agentiso.frontend.cli", "--config", str(config), "serve"]
    if uid is None:
        return StdioServerParameters(command=sys.executable, args=serve, env=env, cwd="/")
    python = getattr(sys, "_base_executable", sys.executable)
    env["PYTHONPATH"] = str(public_frontend_runtime())
    grp = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return StdioServerParameters(
        command="setpriv",
        args=[f"--reuid={uid}", f"--regid={gid if gid is not None else uid}", *grp,
              "--inh-caps=-all", python, "-s", *serve],
        env=env, cwd="/",
    )


#: RFC 3339 date-time, as strict clients (ajv-formats) check it: the offset is required.
_DATE_TIME = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z"
)
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or _DATE_TIME.match(value) is not None


class ToolFailed(Exception):
    """The tool answered with a tool error (``isError``); ``str()`` is its text."""


@dataclass
class Tools:
    session: ClientSession
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    listed: list[Any] = field(default_factory=list)

    async def load(self) -> None:
        result = await self.session.list_tools()
        self.listed = list(result.tools)
        for tool in self.listed:
            assert tool.output_schema is not None, f"{tool.name} has no output schema"
            jsonschema.Draft202012Validator.check_schema(tool.output_schema)
            self.schemas[tool.name] = tool.output_schema

    async def call(self, tool: str, /, **arguments: Any) -> dict[str, Any]:
        """Call a tool; return its structured result (validated), or raise ToolFailed."""
        return await self.call_with(tool, arguments)

    async def call_with(self, name: str, arguments: dict[str, Any], *, progress: Any = None,
                        timeout: float = 300) -> dict[str, Any]:
        """:meth:`call` with a progress callback and a read timeout."""
        result = await self.session.call_tool(name, arguments, read_timeout_seconds=timeout,
                                              progress_callback=progress)
        if result.is_error:
            text = "\n".join(getattr(c, "text", "") for c in result.content)
            assert "Traceback" not in text, text
            raise ToolFailed(text)
        data = result.structured_content
        assert data is not None, f"{name} returned no structured content"
        jsonschema.validate(data, self.schemas[name], cls=jsonschema.Draft202012Validator,
                            format_checker=FORMATS)
        return data

    async def fails(self, name: str, /, **arguments: Any) -> str:
        """Call a tool that must fail; return the error text (two lines: cause, what to do)."""
        try:
            await self.call_with(name, arguments)
        except ToolFailed as exc:
            return str(exc)
        raise AssertionError(f"{name}({arguments}) did not fail")


@asynccontextmanager
async def mcp_tools(params: StdioServerParameters) -> AsyncIterator[Tools]:
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = Tools(session)
        await tools.load()
        yield tools
