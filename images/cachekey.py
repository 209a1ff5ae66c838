"""Content keys for the build's caches.

A key is the sha256 of a canonical description of everything an artefact is made
from; when any input changes the key changes and the artefact is rebuilt, when
nothing does the cached one is reused.  :func:`key_of` is pure; :func:`tree_digest`
reads files but decides nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# Bytecode caches and editor droppings do not change what a tree means.
_IGNORED_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
_IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp")

KeyInput = str | int | bool | None | Sequence["KeyInput"] | Mapping[str, "KeyInput"]


def key_of(kind: str, inputs: Mapping[str, KeyInput]) -> str:
    """sha256 hex of ``kind`` and ``inputs`` (JSON with sorted keys: order-independent)."""
    blob = json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Files under ``root`` that count for its digest, sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS)
        for name in filenames:
            if not name.endswith(_IGNORED_SUFFIXES):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def tree_digest(roots: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (label, relative path, executable bit, content) of every file of each root."""
    h = hashlib.sha256()
    for label, root in roots:
        for path in tree_files(root):
            rel = path.relative_to(root).as_posix()
            executable = os.access(path, os.X_OK)
            h.update(f"{label}\0{rel}\0{int(executable)}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
