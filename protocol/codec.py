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


#: Top-level entries :func:`peek_request_id` looks at before giving up.
PEEK_MAX_ENTRIES = 16

_MAP_HEADER = {0xDE: 2, 0xDF: 4}  # map16, map32: size bytes
#: Fixed-size msgpack values: type byte -> bytes that follow it.
_FIXED = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float32/64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int8..64
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext 1..16 (type byte + data)
}
#: Length-prefixed values: type byte -> (size bytes, extra bytes after the size).
_SIZED = {
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str8/16/32
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin8/16/32
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext8/16/32 (+ type byte)
}


def _scalar_end(body: bytes, pos: int) -> int:
    """Where the scalar value at ``pos`` ends (O(1): its size is in its
    header); -1 for a container, a reserved byte, or a value past the end."""
    t = body[pos]
    if t <= 0x7F or t >= 0xE0:  # positive / negative fixint
        end = pos + 1
    elif 0xA0 <= t <= 0xBF:  # fixstr
        end = pos + 1 + (t & 0x1F)
    elif t in _FIXED:
        end = pos + 1 + _FIXED[t]
    elif t in _SIZED:
        width, extra = _SIZED[t]
        size = int.from_bytes(body[pos + 1 : pos + 1 + width], "big")
        end = pos + 1 + width + extra + size
    else:
        return -1  # fixmap/fixarray/map16/32/array16/32 or 0xc1: not skipped
    return end if end <= len(body) else -1


def _uint_at(body: bytes, pos: int) -> int | None:
    t = body[pos]
    if t <= 0x7F:
        return t
    if 0xCC <= t <= 0xCF:
        width = 1 << (t - 0xCC)
        if pos + 1 + width <= len(body):
            return int.from_bytes(body[pos + 1 : pos + 1 + width], "big")
    return None


def peek_request_id(body: bytes) -> int:
    """Best-effort id of a frame that failed to decode, so the error reply can
    name the request it belongs to; 0 when the body has no usable id.

    Reads only the id: the body must be a map whose ``id`` key comes within
    its first :data:`PEEK_MAX_ENTRIES` entries, after scalar values only (our
    encoders put ``type`` and ``id`` first).  Nothing else of the body is
    looked at, so a 4 MiB frame of garbage costs microseconds of the shared
    event loop, whatever its shape.
    """
    try:
        t = body[0]
        if 0x80 <= t <= 0x8F:
            count, pos = t & 0x0F, 1
        elif t in _MAP_HEADER:
            width = _MAP_HEADER[t]
            count, pos = int.from_bytes(body[1 : 1 + width], "big"), 1 + width
        else:
            return 0
        for _ in range(min(count, PEEK_MAX_ENTRIES)):
            key_end = _scalar_end(body, pos)
            if key_end < 0:
                return 0
            is_id = body[pos:key_end] == b"\xa2id"
            pos = key_end
            if is_id:
                rid = _uint_at(body, pos)
                return rid if rid is not None and rid < 2**63 else 0
            pos = _scalar_end(body, pos)
            if pos < 0:
                return 0
    except IndexError:
        return 0
    return 0
