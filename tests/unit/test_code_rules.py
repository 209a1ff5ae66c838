"""House rules about the code itself, checked so they stay true.

- No module of the product is over 600 lines (a newcomer reads a module whole;
  past that it holds more than one job).  Declarative schemas may be longer:
  they go in :data:`LONG_SCHEMAS`, with the reason.
- The code's comments and docstrings point at the project's own ``docs/``,
  never at documents outside the repository (such as the design contract the
  project was started from): a reader of the code must find what it cites.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("privhelper", "guest", "protocol", "frontend")
MAX_LINES = 600
#: Modules allowed past MAX_LINES because they only declare (path -> why).
LONG_SCHEMAS: dict[str, str] = {}
#: Cited documents outside the repository.
OUTSIDE = re.compile(r"DESIGN(\.md)?\s*§|DESIGN\.md|\.\./shared/")


def modules() -> list[Path]:
    found = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(found) > 50, found  # the walk found the packages
    return found


def test_no_module_is_over_600_lines() -> None:
    long = {}
    for path in modules():
        rel = str(path.relative_to(REPO))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_SCHEMAS:
            long[rel] = n
    assert not long, f"split these (or list a declarative schema in LONG_SCHEMAS): {long}"


def test_the_long_schema_list_names_only_modules_that_exist() -> None:
    for rel in LONG_SCHEMAS:
        assert (REPO / rel).is_file(), rel


def test_no_comment_points_outside_the_repository() -> None:
    hits = []
    for path in modules():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "cite the project's docs/ instead:\n" + "\n".join(hits)


def test_the_rules_catch_what_they_are_about() -> None:
    for bad in ("# see DESIGN §9", "#: DESIGN.md says so", "(../shared/DESIGN.md)"):
        assert OUTSIDE.search(bad), bad
    for fine in ("# see docs/security.md", "design of the relay", "DESIGNATED"):
        assert not OUTSIDE.search(fine), fine
