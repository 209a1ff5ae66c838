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
