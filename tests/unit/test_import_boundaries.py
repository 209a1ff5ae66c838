"""The trust boundary in the import graph (docs/architecture.md).

Every module of agentiso.privhelper, agentiso.guest and agentiso.protocol is
imported in a fresh interpreter in which mcp, pydantic and platformdirs (and
the frontend) cannot be imported at all: if any module needs them, this fails.
The frontend, likewise, must never import the helper.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or any(
                name == b or name.startswith(b + ".") for b in BLOCKED
            ):
                raise ImportError(f"{{name}} is not allowed here")
            return None

    sys.meta_path.insert(0, Blocker())
    for pkg_name in {packages!r}:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            if mod.name.endswith(".__main__"):
                continue  # running it would start the program
            importlib.import_module(mod.name)
    print("OK")
    """
)


def _check(packages: list[str], blocked: list[str]) -> None:
    code = CHECK.format(packages=packages, blocked=set(blocked))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("OK"), r.stderr


@pytest.mark.parametrize("pkg", ["agentiso.privhelper", "agentiso.guest", "agentiso.protocol"])
def test_helper_guest_protocol_import_without_mcp(pkg: str) -> None:
    _check([pkg], ["mcp", "pydantic", "platformdirs", "agentiso.frontend"])


def test_guest_and_protocol_need_only_stdlib_and_msgspec() -> None:
    _check(
        ["agentiso.guest", "agentiso.protocol"],
        ["anyio", "structlog", "qemu", "pyroute2", "agentiso.privhelper", "agentiso.frontend"],
    )


def test_frontend_never_imports_the_helper() -> None:
    _check(["agentiso.frontend"], ["agentiso.privhelper", "qemu", "pyroute2"])
