"""Sans-io decoder of the host -> guest byte stream, as a relayed client sends it.

The stream is frames, and, where a frame header would start, a raw sync
marker: ``HOST_SYNC_MAGIC`` followed by ``SYNC_NONCE_LEN`` nonce bytes (the
client asks for a fresh session).  A marker's first byte (0xff) cannot begin
a valid frame header: that length is beyond any frame limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import FrameTooLarge, FramingError
from agentiso.protocol.framing import HEADER, HEADER_SIZE

_MAGIC = gp.HOST_SYNC_MAGIC
_MARKER_LEN = len(_MAGIC) + gp.SYNC_NONCE_LEN


@dataclass(frozen=True)
class SyncMarker:
    nonce: bytes


class HostStreamDecoder:
    """``feed(bytes) -> [frame body | SyncMarker]``; bounded to one frame."""

    def __init__(self, max_frame: int = gp.GUEST_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes | SyncMarker]:
        self._buf += data
        out: list[bytes | SyncMarker] = []
        buf = self._buf
        while buf:
            if buf[0] == _MAGIC[0]:
                n = min(len(buf), len(_MAGIC))
                if buf[:n] != _MAGIC[:n]:
                    raise FramingError("bytes that are neither a frame nor a sync marker")
                if len(buf) < _MARKER_LEN:
                    break
                out.append(SyncMarker(bytes(buf[len(_MAGIC):_MARKER_LEN])))
                del buf[:_MARKER_LEN]
                continue
            if len(buf) < HEADER_SIZE:
                break
            (length,) = HEADER.unpack_from(buf)
            if length > self.max_frame:
                raise FrameTooLarge(length, self.max_frame)
            if len(buf) < HEADER_SIZE + length:
                break
            out.append(bytes(buf[HEADER_SIZE:HEADER_SIZE + length]))
            del buf[:HEADER_SIZE + length]
        return out
