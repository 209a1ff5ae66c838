"""GuestClient against a hostile or broken guest: a scripted peer on a socketpair
speaks raw bytes, so each test controls exactly what the "guest" sends."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from agentiso.frontend.errors import ConnectionLost, Hop
from agentiso.frontend.guest_client import GuestClient
from agentiso.protocol import guest as gp
from agentiso.protocol.errors import (
    FrameTooLarge,
    RemoteProtocolError,
    RemoteTimeout,
    Unavailable,
    VersionMismatch,
)
from agentiso.protocol.framing import FrameDecoder, encode_frame

pytestmark = pytest.mark.anyio


def hello(nonce: bytes, version: int = gp.GUEST_PROTOCOL_VERSION, session: int = 5) -> bytes:
    msg = gp.Hello(id=0, version=version, agent="fake", transport="socketpair",
                   boot=gp.BootTimings(init_t0=None, agent_start=1, listen=1, hello=1),
                   max_frame=gp.GUEST_MAX_FRAME, max_chunk=gp.MAX_CHUNK, max_inflight=4,
                   session=session, pid1=False, sync_nonce=nonce)
    return gp.GUEST_SYNC_MAGIC + encode_frame(gp.response_codec.encode(msg))


class FakeGuest:
    """The guest end: reads the host's sync marker and frames, writes raw bytes."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.decoder = FrameDecoder(gp.GUEST_MAX_FRAME)

    async def read_sync(self) -> bytes:
        magic = gp.HOST_SYNC_MAGIC
        while (i := self.buf.find(magic)) < 0 or len(self.buf) < i + len(magic) + 8:
            self.buf += await self.stream.receive()
        nonce = self.buf[i + len(magic) : i + len(magic) + 8]
        rest = self.buf[i + len(magic) + 8 :]
        self.buf = b""
        self.pending = self.decoder.feed(rest)
        return nonce

    async def read_request(self) -> gp.GuestRequest:
        while not self.pending:
            self.pending = self.decoder.feed(await self.stream.receive())
        return gp.request_codec.decode(self.pending.pop(0))

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def respond(self, msg: gp.GuestResponse) -> None:
        await self.stream.send(encode_frame(gp.response_codec.encode(msg)))


@asynccontextmanager
async def streams() -> AsyncIterator[tuple[anyio.abc.SocketStream, FakeGuest]]:
    a, b = socket.socketpair()
    host = await anyio.abc.SocketStream.from_socket(a)
    guest = FakeGuest(await anyio.abc.SocketStream.from_socket(b))
    try:
        yield host, guest
    finally:
        await host.aclose()
        await guest.stream.aclose()


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[GuestClient, FakeGuest]]:
    async with streams() as (host, guest):
        async def greet() -> None:
            await guest.send(hello(await guest.read_sync()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(greet)
            async with GuestClient.connect(host, hello_timeout=5) as client:
                yield client, guest
            tg.cancel_scope.cancel()


async def test_stale_hellos_are_ignored_and_the_echo_accepted() -> None:
    async with streams() as (host, guest):
        async def greet() -> None:
            nonce = await guest.read_sync()
            await guest.send(b"leftover bytes from an old connection")
            await guest.send(hello(b"", session=1))  # unprompted: ignored
            await guest.send(hello(b"12345678", session=2))  # someone else's: ignored
            await guest.send(hello(nonce, session=3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(greet)
            async with GuestClient.connect(host, hello_timeout=5) as client:
                assert client.hello is not None and client.hello.session == 3


async def test_version_mismatch_is_refused() -> None:
    async with streams() as (host, guest):
        async def greet() -> None:
            await guest.send(hello(await guest.read_sync(), version=99))

        async with anyio.create_task_group() as tg:
            tg.start_soon(greet)
            with pytest.raises(VersionMismatch):
                async with GuestClient.connect(host, hello_timeout=5):
                    pass


async def test_a_silent_or_garbage_guest_times_out() -> None:
    async with streams() as (host, guest):
        await guest.send(b"\x00" * 10_000)
        with pytest.raises(RemoteTimeout):
            async with GuestClient.connect(host, hello_timeout=1.5):
                pass


async def test_oversize_frame_from_the_guest_fails_requests_fast() -> None:
    async with connected() as (client, guest):
        async def answer_badly() -> None:
            await guest.read_request()
            await guest.send((gp.GUEST_MAX_FRAME + 1).to_bytes(4, "big"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_badly)
            with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
                await client.ping()
        assert info.value.hop is Hop.GUEST_AGENT
        assert isinstance(info.value.__cause__, FrameTooLarge)
        with pytest.raises(ConnectionLost):
            await client.ping()  # the connection is done for


async def test_invalid_message_from_the_guest_is_a_protocol_error() -> None:
    async with connected() as (client, guest):
        async def answer_badly() -> None:
            req = await guest.read_request()
            await guest.send(encode_frame(b"\x82\xa4type\xa4pong\xa2id" + bytes([req.id])))

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_badly)
            with anyio.fail_after(5), pytest.raises(RemoteProtocolError):
                await client.ping()


async def test_a_guest_ignoring_credit_fails_only_that_request() -> None:
    async with connected() as (client, guest):
        async def flood_then_pong() -> None:
            ex = await guest.read_request()
            assert isinstance(ex, gp.Exec) and ex.window == 1
            for seq in range(1, 20):  # far beyond the window
                await guest.respond(gp.ExecOutput(id=ex.id, seq=seq, stream="stdout",
                                                  data=b"x"))
            while True:
                req = await guest.read_request()
                if isinstance(req, gp.Ping):
                    await guest.respond(gp.Pong(id=req.id, uptime_s=1.0))
                    return

        async def slow(stream: gp.OutputStream, data: bytes) -> None:
            await anyio.sleep(1)  # never consumes fast enough

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood_then_pong)
            with anyio.fail_after(10), pytest.raises(RemoteProtocolError):
                await client.exec(["x"], on_output=slow, window=1)
            with anyio.fail_after(5):
                assert (await client.ping()).uptime_s == 1.0


async def test_new_session_fails_in_flight_requests() -> None:
    async with connected() as (client, guest):
        async def restart() -> None:
            await guest.read_request()
            await guest.send(hello(b"", session=99))  # the agent restarted

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart)
            with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
                await client.ping()
        assert info.value.hop is Hop.GUEST_AGENT and "restarted" in str(info.value)
        assert isinstance(info.value, Unavailable)  # code "unavailable", like a peer's
        assert client.hello is not None and client.hello.session == 99


async def test_same_session_greeting_keeps_requests() -> None:
    async with connected() as (client, guest):
        async def regreet() -> None:
            req = await guest.read_request()
            await guest.send(hello(b"", session=5))  # the port saw the host come back
            await guest.respond(gp.Pong(id=req.id, uptime_s=2.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(regreet)
            with anyio.fail_after(5):
                assert (await client.ping()).uptime_s == 2.0


async def test_channel_closed_fails_requests() -> None:
    async with connected() as (client, guest):
        async def hang_up() -> None:
            await guest.read_request()
            await guest.stream.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_up)
            with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
                await client.ping()
        assert info.value.hop is Hop.GUEST_AGENT
        with pytest.raises(ConnectionLost):  # and every later request, at once
            await client.ping()
