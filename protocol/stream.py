"""Async frame reader/writer over any byte stream, without importing an async library.

The reader takes an ``async receive() -> bytes`` callable that returns ``b""``
at end of stream, so the same code serves anyio streams (helper, frontend) and
asyncio streams (guest).  Memory stays bounded by the decoder's frame limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame


class FrameReader:
    def __init__(
        self,
        receive: Callable[[], Awaitable[bytes]],
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self._receive = receive
        self._decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held now: a partial frame, and whole frames not yet read."""
        return self._decoder.buffered + sum(len(f) for f in self._ready)

    async def read(self) -> bytes | None:
        """Next frame body, or None at a clean end of stream.

        Raises FrameTooLarge / TruncatedFrame (both RemoteProtocolError) on a bad stream.
        """
        while not self._ready:
            if self._eof:
                return None
            data = await self._receive()
            if not data:
                self._eof = True
                self._decoder.close()
                continue
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def detach(self) -> bytes:
        """Stop framing: return every byte received but not yet returned by
        :meth:`read` (frames already decoded are framed again), in order."""
        out = b"".join(encode_frame(f, self._decoder.max_frame) for f in self._ready)
        self._ready.clear()
        return out + self._decoder.take_buffered()
