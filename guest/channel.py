"""Byte channels the agent serves a session over.

A channel is a bidirectional byte stream: ``receive`` returns ``b""`` when the
host side is gone, ``send`` raises :class:`ChannelClosed`.  One class covers
sockets (unix, vsock, socketpair) and the virtio-serial character device: all
are non-blocking file descriptors.  On a virtio port, a read of 0 bytes means
"no host connected" (the port itself stays usable), and a write blocks rather
than fails while no host is connected, so POLLHUP is checked to notice that.
"""

from __future__ import annotations

from typing import Protocol

from .errors import ChannelClosed
from .fdio import read_some, set_nonblocking, write_all

RECEIVE_SIZE = 256 * 1024


class Channel(Protocol):
    name: str
    #: Whether a framing error can be recovered from in-band (see Session):
    #: true for byte pipes that cannot be reopened per connection.
    resyncable: bool

    async def receive(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...


class FdChannel:
    def __init__(self, fd: int, name: str, *, virtio: bool = False, resyncable: bool = False):
        set_nonblocking(fd)
        self.fd = fd
        self.name = name
        self.virtio = virtio
        self.resyncable = resyncable or virtio

    async def receive(self) -> bytes:
        try:
            data = await read_some(self.fd, RECEIVE_SIZE)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        return data or b""

    async def send(self, data: bytes) -> None:
        try:
            await write_all(self.fd, data, hup_is_eof=self.virtio)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from None
        except OSError as exc:
            raise ChannelClosed(f"{self.name}: {exc}") from None
