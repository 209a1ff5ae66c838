"""Run the real agent in-process over a socketpair, with the real client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio.abc

from agentiso.frontend.guest_client import GuestClient
from agentiso.guest.agent import Agent
from agentiso.guest.channel import FdChannel


@dataclass
class Pair:
    agent: Agent
    client: GuestClient
    stream: anyio.abc.SocketStream


@asynccontextmanager
async def agent_pair(
    max_inflight: int = 64, secret: bytes | None = None, client_secret: bytes | None = None
) -> AsyncIterator[Pair]:
    """An in-process agent serving one end of a socketpair; a GuestClient on the other."""
    ours, theirs = socket.socketpair()
    agent = Agent(pid1=False, max_inflight=max_inflight)
    agent.start()
    agent.mark_listening()
    chan = FdChannel(theirs.detach(), "socketpair", resyncable=True)
    task = asyncio.get_running_loop().create_task(agent.serve(chan, secret))
    stream = await anyio.abc.SocketStream.from_socket(ours)
    try:
        async with GuestClient.connect(
            stream, secret=client_secret or secret, hello_timeout=10
        ) as client:
            yield Pair(agent, client, stream)
    finally:
        await stream.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        agent.close()
        os.close(chan.fd)
