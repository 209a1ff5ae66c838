"""docs/configuration.md is generated from the config structs: it must match
them (every key, its type, default and meaning), and every key must have a
meaning."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def _configdoc() -> ModuleType:
    return load_script("configdoc")


def test_configuration_reference_is_current() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == _configdoc().current(), (
        "docs/configuration.md is stale: regenerate it with\n"
        "  .venv/bin/python scripts/configdoc.py > docs/configuration.md")


def test_every_key_has_a_meaning_and_every_section_is_there() -> None:
    text = _configdoc().current()
    assert "(undocumented)" not in text, (
        "a config key has no meaning: give its field a '#:' comment in its struct "
        "(or an entry in scripts/configdoc.py MEANINGS)")
    for section in ("[server]", "[paths]", "[limits]", "[storage]", "[storage.zfs]", "[net]",
                    "[vm]", "[defaults]", "[quotas]"):
        assert f"### `{section}`" in text, section
    # Defaults come from the structs themselves.
    from agentiso.frontend.config import Quotas
    from agentiso.privhelper.config import ServerConfig

    assert f'| `socket` | string | `"{ServerConfig().socket}"` |' in text
    assert f"| `workspaces` | integer (>= 0, <= 1048576) | `{Quotas().workspaces}` |" in text
    assert "| `socket_mode` | integer (>= 0, <= 511) | `0o660` |" in text
