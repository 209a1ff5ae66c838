"""Validation of names and sizes, again, inside the backend.

The protocol decoder already refuses bad names (``agentiso.protocol.types.Name``);
this is defence in depth: a backend turns names into paths and dataset names, so
it checks every one it is handed, whoever the caller is.  Pure functions.
"""

from __future__ import annotations

import re

from .errors import InvalidName, InvalidSize

#: Same language as ``agentiso.protocol.types.NAME_PATTERN``, but matched with
#: ``fullmatch``: ``$`` in a ``re.match`` pattern also accepts a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
NAME_MAX = 63

#: Volumes are sized in whole sectors; QEMU and ZFS both want that.
SECTOR = 512
MIB = 1024 * 1024
GIB = 1024 * MIB
TIB = 1024 * GIB


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid resource name, else raise :class:`InvalidName`."""
    if not isinstance(value, str):
        raise InvalidName(kind, value, "not a string")
    if not value:
        raise InvalidName(kind, value, "empty")
    if len(value) > NAME_MAX:
        raise InvalidName(kind, value, f"longer than {NAME_MAX} characters")
    if _NAME_RE.fullmatch(value) is None:
        raise InvalidName(
            kind, value, "only a-z, 0-9 and '-' are allowed, starting with a letter or digit"
        )
    return value


def check_size(value: object, *, minimum: int, maximum: int) -> int:
    """Return ``value`` if it is a sector-aligned byte count in range, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSize(value, "not an integer number of bytes")
    if value <= 0:
        raise InvalidSize(value, "must be positive")
    if value < minimum:
        raise InvalidSize(value, f"smaller than the minimum of {minimum} bytes")
    if value > maximum:
        raise InvalidSize(value, f"larger than the maximum of {maximum} bytes")
    if value % SECTOR:
        raise InvalidSize(value, f"not a multiple of {SECTOR} bytes")
    return value
