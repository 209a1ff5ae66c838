"""Shared test configuration.

* Async tests use anyio's own pytest plugin on the asyncio backend:
  mark them ``@pytest.mark.anyio``.
* Integration tests (``tests/integration``) use real system components and
  need root; they are skipped with an explicit reason where that is missing.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="integration tests need root"))


def _host_footprint() -> dict[str, set[str]]:
    """What of ours could leak onto the host: nft tables, links, namespaces,
    QEMU processes named like ours, system state directories."""
    import subprocess
    from pathlib import Path

    def lines(*argv: str) -> set[str]:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return {line.strip() for line in out.splitlines() if "agentiso" in line}

    qemus = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if argv.startswith(b"qemu-system") and b"agentiso-" in argv:
                qemus.add(p.name)
    return {
        "nft tables": lines("nft", "list", "tables"),
        "links": {x.split(":")[1].strip() for x in lines("ip", "-o", "link")},
        "network namespaces": lines("ip", "netns", "list"),
        "QEMU pids": qemus,
        "state dirs": {d for d in ("/var/lib/agentiso", "/run/agentiso") if Path(d).exists()},
    }


@pytest.fixture(scope="session", autouse=True)
def host_left_clean() -> object:
    """Fail the run if the tests left anything of ours on the host."""
    if os.geteuid() != 0:
        yield None
        return
    before = _host_footprint()
    yield None
    after = _host_footprint()
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked, f"the test run left these behind on the host: {leaked}"
