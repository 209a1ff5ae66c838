"""The agent's cap on unauthenticated connections (guest/transport.py).

On vsock any local process of the host can connect to a guest's agent.  The
attack: a flood of connections that never authenticate.  The agent keeps at
most a few of them (the oldest go), and the helper's own connection, which
presents the secret at once, is still served.  Run with the real agent over
a unix listener: the same listener code serves vsock in a VM.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from agentiso.frontend.errors import ConnectionLost
from agentiso.frontend.guest_client import GuestClient
from agentiso.guest.agent import Agent
from agentiso.guest.transport import (
    MAX_UNAUTHENTICATED,
    AuthGate,
    serve_listener,
    unix_listener,
)
from agentiso.protocol.errors import PermissionDenied

pytestmark = pytest.mark.anyio
SECRET = os.urandom(32)


def test_gate_evicts_the_oldest_pending_and_caps_sessions() -> None:
    gate = AuthGate(max_pending=2, max_sessions=1)
    evicted: list[str] = []
    assert gate.admit("a", lambda: evicted.append("a"))
    assert gate.admit("b", lambda: evicted.append("b"))
    assert gate.admit("c", lambda: evicted.append("c"))  # a goes, not c
    assert evicted == ["a"] and list(gate.pending) == ["b", "c"]
    gate.authenticated("c")
    assert gate.sessions == {"c"} and list(gate.pending) == ["b"]
    assert not gate.admit("d", lambda: None)  # one session is the cap
    gate.authenticated("a")  # evicted already: no session from it
    assert gate.sessions == {"c"}
    gate.gone("c")
    assert gate.admit("d", lambda: None)


async def _agent_listening(tmp: Path, gate: AuthGate | None) -> AsyncIterator[str]:
    agent = Agent(pid1=False)
    agent.start()
    agent.mark_listening()
    path = str(tmp / "agent.sock")
    listener = unix_listener(path)
    task = asyncio.get_running_loop().create_task(
        serve_listener(listener, "vsock", agent.serve, SECRET, gate))
    try:
        yield path
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        listener.close()
        agent.close()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


async def _dropped(s: socket.socket) -> bool:
    """Whether the agent closed ``s`` (EOF within a short wait)."""
    with anyio.move_on_after(0.5):
        while True:
            await anyio.wait_readable(s)
            try:
                if s.recv(4096) == b"":
                    return True
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return True
    return False


async def test_a_flood_of_unauthenticated_connections_is_capped(tmp_path: Path) -> None:
    gen = _agent_listening(tmp_path, None)
    path = await gen.__anext__()
    flood: list[socket.socket] = []
    try:
        for _ in range(40):  # a blocking connect: let the agent accept between them
            flood.append(_raw(path))
            await anyio.sleep(0.01)
        await anyio.sleep(0.5)  # let the agent accept them all
        # The helper (who has the secret) is still served during the flood.
        async with await anyio.connect_unix(path) as s, \
                GuestClient.connect(s, secret=SECRET, hello_timeout=10) as c:
            assert (await c.exec(["echo", "ok"])).stdout == b"ok\n"
        dropped = [await _dropped(s) for s in flood]
        # At most MAX_UNAUTHENTICATED wait at once: the oldest were dropped.
        assert sum(dropped) >= len(flood) - MAX_UNAUTHENTICATED, dropped
        assert not any(dropped[-(MAX_UNAUTHENTICATED - 1):]), dropped  # the newest stay
        # A wrong secret is still refused.
        with pytest.raises(PermissionDenied):
            async with await anyio.connect_unix(path) as s, \
                    GuestClient.connect(s, secret=b"w" * 32, hello_timeout=10):
                pass
    finally:
        for s in flood:
            s.close()
        await gen.aclose()


async def test_sessions_are_capped_and_a_slot_comes_back(tmp_path: Path) -> None:
    gen = _agent_listening(tmp_path, AuthGate(max_pending=4, max_sessions=2))
    path = await gen.__anext__()
    try:
        async with await anyio.connect_unix(path) as s1, \
                await anyio.connect_unix(path) as s2, \
                GuestClient.connect(s1, secret=SECRET, hello_timeout=10), \
                GuestClient.connect(s2, secret=SECRET, hello_timeout=10):
            third = _raw(path)
            try:
                assert await _dropped(third)  # refused at once: two sessions is the cap
            finally:
                third.close()
        # The two sessions end on the agent's side a moment after we close
        # them: retry (bounded) instead of sleeping a guess.
        for attempt in range(100):
            try:
                async with await anyio.connect_unix(path) as s, \
                        GuestClient.connect(s, secret=SECRET, hello_timeout=10) as c:
                    assert (await c.exec(["true"])).exit_code == 0
                break
            except (ConnectionLost, OSError):
                if attempt == 99:
                    raise
                await anyio.sleep(0.05)
    finally:
        await gen.aclose()
