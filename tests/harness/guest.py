"""A GuestClient on a harness VM's channel, for tests that talk to the agent directly."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
import anyio.abc

from agentiso.frontend.guest_client import GuestClient


class ChannelVM(Protocol):
    """A VM whose agent channel a test can open (EngineVM, or BootedVM for image tests)."""

    def connect_channel(self, timeout: float = ...) -> socket.socket: ...

    def tail(self, lines: int = ...) -> str: ...


@asynccontextmanager
async def connect(vm: ChannelVM) -> AsyncIterator[GuestClient]:
    """Connect to ``vm``'s agent; a failure carries the guest console's tail."""
    sock = await anyio.to_thread.run_sync(vm.connect_channel, 30.0)
    stream = await anyio.abc.SocketStream.from_socket(sock)
    try:
        async with GuestClient.connect(stream, hello_timeout=90) as client:
            yield client
    except Exception as exc:
        # The guest's console says what the agent saw; keep it with the failure.
        exc.add_note(f"--- guest console tail ---\n{vm.tail(30)}")
        raise
    finally:
        await stream.aclose()
