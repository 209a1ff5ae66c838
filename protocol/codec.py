"""Message codec: msgspec structs <-> frame bodies.

A :class:`Codec` decodes a frame body into one member of a tagged union and
turns every failure into :class:`DecodeError`, so callers never see msgspec's
exceptions and never a raw dict.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from .errors import DecodeError

T = TypeVar("T")


class Codec(Generic[T]):
    """Encode any message; decode only members of ``union``."""

    def __init__(self, union: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(union)
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, body: bytes) -> T:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:  # ValidationError is a subclass
            raise DecodeError(str(exc)) from None


def peek_request_id(body: bytes) -> int:
    """Best-effort id of a frame that failed to decode, so the error reply can
    name the request it belongs to; 0 when the body has no usable id."""
    try:
        obj = msgspec.msgpack.decode(body)
    except Exception:
        return 0
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return 0
