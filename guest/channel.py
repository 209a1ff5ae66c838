"""Byte channels the agent serves a session over.

A channel is a bidirectional byte stream: ``receive`` returns ``b""`` when the
host side is gone, ``send`` raises :class:`ChannelClosed`.  One class covers
sockets (unix, vsock, socketpair) and the virtio-serial character device: all
are non-blocking file descriptors.

A virtio port outlives its hosts.  While no host is connected, a read returns
0 bytes, poll() reports POLLHUP, and a write blocks (EAGAIN).  Such a gap may
also be a *flap* seen late: the guest driver applies the host's
disconnect/connect notices asynchronously to the data, so a session can see
"no host" for a moment while the new (or same) host is already sending.  So
on a virtio port neither a 0-byte read nor a blocked write ends anything: the
channel waits for a host to be connected again (``wait_reconnect``) and the
session goes on; a genuinely new host announces itself with a sync marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from typing import Protocol

from agentiso.protocol.errors import map_exceptions

from .errors import ChannelClosed
from .fdio import _wait, hung_up, read_some, set_nonblocking

RECEIVE_SIZE = 256 * 1024
VIRTIO_PAGE = 4096
VIRTIO_PAGES = 64
#: How often a virtio channel with no host checks whether one came back
#: (a SIGIO from the driver wakes it sooner).
RECONNECT_POLL_S = 0.25


class Channel(Protocol):
    name: str
    #: Whether a framing error can be recovered from in-band (see Session):
    #: true for byte pipes that cannot be reopened per connection.
    resyncable: bool

    async def receive(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def wait_reconnect(self) -> bool:
        """After ``receive`` returned ``b""``: wait until a host is there
        again and return True, or return False if the channel is finished."""
        ...


class FdChannel:
    def __init__(
        self,
        fd: int,
        name: str,
        *,
        virtio: bool = False,
        resyncable: bool = False,
        woken: asyncio.Event | None = None,
    ) -> None:
        set_nonblocking(fd)
        self.fd = fd
        self.name = name
        self.virtio = virtio
        self.resyncable = resyncable or virtio
        #: Set by the SIGIO handler (virtio: the host connected or went away).
        self.woken = woken
        self._page_buf = bytearray()
        self._pages: list[memoryview] | None = None

    async def receive(self) -> bytes:
        if self.virtio:
            return await self._receive_pages()
        try:
            data = await read_some(self.fd, RECEIVE_SIZE)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        return data or b""

    async def _receive_pages(self) -> bytes:
        """A virtio port hands out one buffer (a page) per read(2); readv(2)
        with page-sized pieces takes many in one system call, which under TCG
        is most of the cost of moving data into the guest."""
        if self._pages is None:
            self._page_buf = bytearray(VIRTIO_PAGES * VIRTIO_PAGE)
            view = memoryview(self._page_buf)
            self._pages = [view[i * VIRTIO_PAGE : (i + 1) * VIRTIO_PAGE]
                           for i in range(VIRTIO_PAGES)]
        while True:
            try:
                n = os.readv(self.fd, self._pages)
            except BlockingIOError:
                await _wait(self.fd, False, None)
                continue
            return bytes(memoryview(self._page_buf)[:n])  # one copy, not two

    async def wait_reconnect(self) -> bool:
        if not self.virtio:
            return False
        if not hung_up(self.fd):
            return True
        # SIGIO only while waiting: the driver also signals every arriving
        # buffer, which would cost a wake-up per chunk during transfers.
        self._set_async(True)
        try:
            while hung_up(self.fd):
                if self.woken is None:
                    await asyncio.sleep(RECONNECT_POLL_S)
                    continue
                self.woken.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECONNECT_POLL_S):
                        await self.woken.wait()
        finally:
            self._set_async(False)
        return True

    def _set_async(self, on: bool) -> None:
        if self.woken is None:
            return
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            flags = flags | os.O_ASYNC if on else flags & ~os.O_ASYNC
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def _write(self, data: memoryview) -> int:
        """One write(2); 0 when it would block.  The one place where a failed
        write (the host went away, the fd broke) becomes ChannelClosed."""
        with map_exceptions({OSError: lambda exc: ChannelClosed(f"{self.name}: {exc}")}):
            try:
                return os.write(self.fd, data)
            except BlockingIOError:
                return 0

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if n := self._write(view):
                view = view[n:]
                continue
            if self.virtio and hung_up(self.fd):
                # No host right now: the write would block until one comes.
                await self.wait_reconnect()
                continue
            await _wait(self.fd, True, None)
