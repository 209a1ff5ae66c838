"""Listings that never outgrow a frame (pure).

An answer larger than the helper's frame limit could not be sent at all, so
every listing is cut into pages of at most ``LISTING_PAGE_BYTES`` encoded
(see ``Cursor`` in the protocol): the client asks again from ``next_cursor``
until an answer has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import msgspec

from agentiso.protocol.helper import LISTING_PAGE_BYTES

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def page(
    items: Sequence[T], cursor: int, budget: int = LISTING_PAGE_BYTES
) -> tuple[list[T], int | None]:
    """``items`` from ``cursor`` on, as many as fit in ``budget`` bytes of msgpack
    (always at least one, so every page moves on), and the next page's cursor
    (None: this was the last page).  A cursor past the end gives an empty last page."""
    out: list[T] = []
    used = 0
    for i in range(cursor, len(items)):
        size = len(_encoder.encode(items[i]))
        if out and used + size > budget:
            return out, i
        out.append(items[i])
        used += size
    return out, None
