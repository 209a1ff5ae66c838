"""Awaitable reads and writes on non-blocking file descriptors.

Pipes, sockets and the virtio-serial character device all go through these:
asyncio's pipe transports would close the fd at EOF and own the buffering,
while the agent needs EOF to mean "host gone" on a port it keeps open, and
wants to stop reading (backpressure) whenever a consumer has no credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select


async def _wait(fd: int, write: bool, timeout: float | None) -> bool:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        if timeout is None:
            await fut
            return True
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def read_some(fd: int, size: int, timeout: float | None = None) -> bytes | None:
    """Up to ``size`` bytes; ``b""`` at EOF; None if ``timeout`` passed first."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        if not await _wait(fd, False, timeout):
            return None


def hung_up(fd: int) -> bool:
    """Whether poll() reports POLLHUP on ``fd`` (a virtio port with no host)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


async def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything; BrokenPipeError when the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        await _wait(fd, True, None)


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
