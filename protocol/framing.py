"""Length-prefixed framing shared by both hops (frontend<->helper, helper<->guest).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
body (a msgpack document).  This module is sans-io, in the style of h11: it
never touches a socket.  Feed it whatever bytes arrived, take out whole frame
bodies; give it a body, get back the bytes to send.

Bounded memory is the contract: the decoder rejects a length prefix above its
limit *before* buffering the body, so a peer can make it hold at most
``max_frame + 4`` bytes plus one ``feed`` worth of input.
"""

from __future__ import annotations

import struct

from .errors import FrameTooLarge, OversizeMessage, TruncatedFrame

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

#: Default limit on one frame body.  Large enough for a 1 MiB file chunk plus
#: envelope, small enough that a hostile peer cannot make us allocate much.
DEFAULT_MAX_FRAME = 4 * 1024 * 1024


def frame_length(header: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """The body length a frame header announces, checked against ``max_frame``
    before anything more is read (:class:`FrameTooLarge` otherwise).  For
    readers that must take exactly one frame off a stream and leave the rest
    (e.g. the helper's last frame before a relayed guest stream)."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, not {len(header)}")
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise FrameTooLarge(length, max_frame)
    return int(length)


def encode_frame(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Return ``body`` with its length prefix.

    Raises :class:`OversizeMessage` (a :class:`LocalProtocolError`) if the
    body exceeds ``max_frame``: the sender checks the same limit as the
    receiver so a bug shows up on our side, before anything is sent.
    """
    if len(body) > max_frame:
        raise OversizeMessage(len(body), max_frame)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental frame decoder.

    Usage::

        dec = FrameDecoder()
        for body in dec.feed(chunk):
            handle(body)
        ...
        dec.close()  # at EOF: raises TruncatedFrame if a frame was cut short

    After :class:`FrameTooLarge` is raised the stream is unusable (we cannot
    know where the next frame starts); the caller must drop the connection.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame in progress
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the bodies of every frame now complete."""
        if self._broken:
            raise FrameTooLarge(-1, self.max_frame)
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                (length,) = HEADER.unpack_from(self._buf)
                if length > self.max_frame:
                    self._broken = True
                    self._buf.clear()
                    raise FrameTooLarge(length, self.max_frame)
                del self._buf[:HEADER_SIZE]
                self._need = length
            if len(self._buf) < self._need:
                break
            # One copy of the body (a slice of a bytearray would be a second:
            # 4 MiB frames are on the shared event loop's time).
            with memoryview(self._buf) as view:
                frames.append(bytes(view[: self._need]))
            del self._buf[: self._need]
            self._need = None
        return frames

    def take_buffered(self) -> bytes:
        """Hand back the bytes not yet returned as frames (a partial frame,
        header included) and reset: for a stream that stops being framed."""
        head = b"" if self._need is None else HEADER.pack(self._need)
        data = head + bytes(self._buf)
        self._buf.clear()
        self._need = None
        return data

    def close(self) -> None:
        """Declare end of stream; raise :class:`TruncatedFrame` on a partial frame."""
        pending = len(self._buf) + (HEADER_SIZE if self._need is not None else 0)
        if pending and not self._broken:
            raise TruncatedFrame(pending)
