"""Sans-io decoders of the guest channel's two byte streams.

The channel carries frames (:mod:`agentiso.protocol.framing`) and, where a
frame header would start, raw sync markers (:mod:`.guest_constants`).  A
marker's first byte, 0xff, cannot begin a valid frame header (that length is
beyond any frame limit), so a decoder tells the two apart at a frame boundary.

* :class:`GuestStreamDecoder`: what the agent sends (decoded by the host: the
  helper's relay, the frontend's client): stale bytes, ``GUEST_SYNC_MAGIC``,
  frames, and again a marker for every new greeting.
* :class:`HostStreamDecoder`: what a host sends (decoded by the agent, and by
  the relay for its clients): frames and ``HOST_SYNC_MAGIC`` + nonce markers.

Neither touches I/O; both keep memory bounded to one frame plus one ``feed``
worth of input.  Both raise :class:`RemoteProtocolError` subclasses: the byte
stream is the peer's doing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FrameTooLarge, FramingError
from .framing import HEADER, HEADER_SIZE
from .guest_constants import (
    GUEST_MAX_FRAME,
    GUEST_SYNC_MAGIC,
    HOST_SYNC_MAGIC,
    SYNC_NONCE_LEN,
    MiB,
)

#: A host marker on the wire: magic, then the nonce.
HOST_MARKER_LEN = len(HOST_SYNC_MAGIC) + SYNC_NONCE_LEN


@dataclass(frozen=True, slots=True)
class HostMarker:
    """A host sync marker: the host asks for a (new) session, answered by a
    Hello whose ``sync_nonce`` is ``nonce``."""

    nonce: bytes

    def encode(self) -> bytes:
        return HOST_SYNC_MAGIC + self.nonce


def host_marker(nonce: bytes) -> bytes:
    """The raw bytes of a host sync marker with ``nonce``."""
    if len(nonce) != SYNC_NONCE_LEN:
        raise ValueError(f"a sync nonce is {SYNC_NONCE_LEN} bytes")
    return HOST_SYNC_MAGIC + nonce


class GuestStreamDecoder:
    """Sans-io decoder of the guest -> host byte stream: sync markers and frames.

    The stream is: any stale bytes, ``GUEST_SYNC_MAGIC``, frames; and again a
    marker whenever the agent greets on the same channel.

    :meth:`feed` returns the items now complete: ``None`` for each marker (a
    greeting follows), ``bytes`` for each frame body.  Memory: at most one
    frame plus one ``feed`` worth of input; scanning for a marker keeps only a
    marker's length of bytes and gives up after ``max_scan``
    (:class:`FramingError`).  An oversize length raises :class:`FrameTooLarge`.
    """

    def __init__(self, max_frame: int = GUEST_MAX_FRAME, max_scan: int = 64 * MiB) -> None:
        self.max_frame = max_frame
        self.max_scan = max_scan
        self._buf = bytearray()
        self._synced = False
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes | None]:
        self._buf += data
        out: list[bytes | None] = []
        magic = GUEST_SYNC_MAGIC
        while True:
            if not self._synced:
                idx = self._buf.find(magic)
                if idx < 0:
                    keep = len(magic) - 1
                    self._scanned += max(len(self._buf) - keep, 0)
                    del self._buf[:-keep]
                    if self._scanned > self.max_scan:
                        raise FramingError("no sync marker from the guest agent")
                    return out
                del self._buf[: idx + len(magic)]
                self._synced = True
                self._scanned = 0
                out.append(None)
                continue
            if not self._buf:
                return out
            if self._buf[0] == magic[0]:
                self._synced = False
                continue
            if len(self._buf) < HEADER_SIZE:
                return out
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise FrameTooLarge(length, self.max_frame)
            if len(self._buf) < HEADER_SIZE + length:
                return out
            out.append(bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length]))
            del self._buf[: HEADER_SIZE + length]


class HostStreamDecoder:
    """Sans-io decoder of the host -> guest byte stream: frames and host markers.

    ``feed(bytes) -> [frame body | HostMarker]``, in stream order; or, one
    at a time, :meth:`receive_data` and :meth:`next_item` (h11's style).

    A framing violation (a length above ``max_frame``, or a 0xff byte that does
    not begin ``HOST_SYNC_MAGIC``) raises :class:`FrameTooLarge` /
    :class:`FramingError`; items completed earlier in that same ``feed`` are
    dropped with the broken stream.  The decoder keeps the bytes from the
    violation on and stays broken (every call raises again) until the
    caller either drops the connection or calls :meth:`resync`.

    :meth:`resync` gives up framing: input (what is held, and what comes) is
    discarded up to the next complete host marker, which is then returned as
    an item, and framing resumes after it.  A dead frame whose body swallowed
    a new host's marker is found that way too.

    ``max_frame`` may be changed between feeds (the agent accepts only a small
    ``Auth`` frame first on vsock).
    """

    def __init__(self, max_frame: int = GUEST_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: FramingError | None = None
        self._scanning = False

    @property
    def scanning(self) -> bool:
        """Discarding input until a host marker (after :meth:`resync`)."""
        return self._scanning

    @property
    def mid_frame(self) -> bool:
        """Bytes of an unfinished frame (or marker) are held."""
        return not self._scanning and self._broken is None and bool(self._buf)

    @property
    def pending_length(self) -> int | None:
        """Body length of the frame being received, once its header is in."""
        if not self.mid_frame or len(self._buf) < HEADER_SIZE or self._buf[0] == 0xFF:
            return None
        return int(HEADER.unpack_from(self._buf)[0])

    def resync(self) -> None:
        """Discard input up to the next host marker (see the class docstring)."""
        self._broken = None
        self._scanning = True

    def receive_data(self, data: bytes) -> None:
        """Add received bytes (take the items out with :meth:`next_item`)."""
        if self._broken is not None:
            raise self._broken
        self._buf += data

    def feed(self, data: bytes) -> list[bytes | HostMarker]:
        """:meth:`receive_data`, then every item now complete."""
        self.receive_data(data)
        out: list[bytes | HostMarker] = []
        while (item := self.next_item()) is not None:
            out.append(item)
        return out

    def next_item(self) -> bytes | HostMarker | None:
        """The next complete item, or None until more bytes arrive.

        One item at a time lets a caller change ``max_frame`` between items
        (the agent raises it once ``Auth`` is accepted)."""
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        magic = HOST_SYNC_MAGIC
        if self._scanning:
            idx = buf.find(magic)
            if idx < 0:
                del buf[: max(len(buf) - (len(magic) - 1), 0)]
                return None
            del buf[:idx]
            if len(buf) < HOST_MARKER_LEN:
                return None
            self._scanning = False
        if not buf:
            return None
        if buf[0] == magic[0]:
            n = min(len(buf), len(magic))
            if buf[:n] != magic[:n]:
                raise self._break(FramingError(
                    "bytes that are neither a frame nor a host sync marker"))
            if len(buf) < HOST_MARKER_LEN:
                return None
            marker = HostMarker(bytes(buf[len(magic) : HOST_MARKER_LEN]))
            del buf[:HOST_MARKER_LEN]
            return marker
        if len(buf) < HEADER_SIZE:
            return None
        (length,) = HEADER.unpack_from(buf)
        if length > self.max_frame:
            raise self._break(FrameTooLarge(length, self.max_frame))
        if len(buf) < HEADER_SIZE + length:
            return None
        body = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
        del buf[: HEADER_SIZE + length]
        return body

    def _break(self, exc: FramingError) -> FramingError:
        self._broken = exc
        return exc
