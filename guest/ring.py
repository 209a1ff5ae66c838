"""A byte ring buffer addressed by absolute stream offsets (pure, no I/O).

A job's output stream is an unbounded sequence of bytes; we keep its last
``capacity`` bytes.  Readers ask "from offset N": they get what is still held
from there, and how many bytes they missed because the ring overwrote them.
"""

from __future__ import annotations


class RingBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = bytearray()
        #: Bytes ever written (the offset just past the newest byte).
        self.total = 0

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return self.total - len(self._buf)

    def write(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.capacity:
            self._buf = bytearray(data[-self.capacity :])
            return
        self._buf += data
        excess = len(self._buf) - self.capacity
        if excess > 0:
            del self._buf[:excess]

    def read(self, offset: int, max_bytes: int) -> tuple[int, bytes, int]:
        """``(start, data, lost)``: data from ``max(offset, self.start)``, at
        most ``max_bytes``; ``lost`` bytes between ``offset`` and ``start`` are gone.
        An offset past the end yields no data at ``total``."""
        offset = min(max(offset, 0), self.total)
        start = max(offset, self.start)
        lost = start - offset
        i = start - self.start
        return start, bytes(self._buf[i : i + max_bytes]), lost
