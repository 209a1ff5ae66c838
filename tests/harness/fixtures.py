"""pytest fixture factory: a VM booted once per module (or per test) and always stopped.

# in a test module
from tests.harness.fixtures import vm_fixture
minimal_vm = vm_fixture("minimal", scope="module")

def test_something(minimal_vm): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

from .images import require_image
from .vm import BootedVM, boot_vm

Scope = Literal["session", "package", "module", "class", "function"]


def vm_fixture(
    image: str = "minimal", *, scope: Scope = "module", **boot_kwargs: Any
) -> Callable[..., Iterator[BootedVM]]:
    """A fixture that boots ``image`` (skipping when it cannot) and stops it afterwards."""

    @pytest.fixture(scope=scope)
    def _vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedVM]:
        info = require_image(image)
        vm = boot_vm(info, tmp_path_factory.mktemp(f"vm-{image}"), **boot_kwargs)
        try:
            yield vm
        finally:
            vm.stop()

    return _vm
