"""Decide which outputs of an image a build must (re)make.

An image directory holds ``vmlinuz``, ``initrd.img``, ``rootfs.img`` and
``manifest.json``.  The manifest records, per output, the cache key of the inputs
it was made from and the size it had.  An output is rebuilt when its key changed,
when it is missing, or when its size no longer matches (a truncated or replaced
file).  Pure: the caller passes the manifest and the files' current sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OUTPUTS = ("vmlinuz", "initrd.img", "rootfs.img")


def outputs_to_build(
    wanted_keys: Mapping[str, str],
    manifest: Mapping[str, Any] | None,
    sizes: Mapping[str, int | None],
) -> list[str]:
    """Return the outputs (in :data:`OUTPUTS` order) that are stale.

    ``wanted_keys`` maps each output to the key of its current inputs; ``manifest``
    is the parsed manifest.json of the previous build (None when absent or
    unreadable); ``sizes`` maps each output to its size on disk (None if missing).
    """
    recorded_keys: Mapping[str, Any] = {}
    recorded_files: Mapping[str, Any] = {}
    if isinstance(manifest, Mapping):
        keys = manifest.get("inputs")
        files = manifest.get("files")
        recorded_keys = keys if isinstance(keys, Mapping) else {}
        recorded_files = files if isinstance(files, Mapping) else {}
    stale: list[str] = []
    for name in OUTPUTS:
        record = recorded_files.get(name)
        recorded_size = record.get("size") if isinstance(record, Mapping) else None
        size = sizes.get(name)
        if recorded_keys.get(name) != wanted_keys[name] or size is None or recorded_size != size:
            stale.append(name)
    return stale
