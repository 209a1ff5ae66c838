"""GuestClient against a hostile or broken guest: a scripted peer on a socketpair
speaks raw bytes, so each test controls exactly what the "guest" sends."""

from __future__ import annotations

import math
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from agentiso.frontend.errors import (
    ConnectionLost,
    HelperUnavailable,
    Hop,
    InvalidArgument,
    RequestTimeout,
)
from agentiso.frontend.guest_channel import open_guest
from agentiso.frontend.guest_client import GuestClient
from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import (
    ErrorCode,
    FrameTooLarge,
    InvalidRequest,
    NotFound,
    PermissionDenied,
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
async def connected(**kw: Any) -> AsyncIterator[tuple[GuestClient, FakeGuest]]:
    async with streams() as (host, guest):
        async def greet() -> None:
            await guest.send(hello(await guest.read_sync()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(greet)
            async with GuestClient.connect(host, hello_timeout=5, **kw) as client:
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


# --- one client shape: ids, timeouts, errors (same rules as the helper client) ----------


async def answer_pings(guest: FakeGuest, seen: list[gp.GuestRequest] | None = None) -> None:
    while True:
        req = await guest.read_request()
        if seen is not None:
            seen.append(req)
        if isinstance(req, gp.Ping):
            await guest.respond(gp.Pong(id=req.id, uptime_s=7.0))


async def test_concurrent_requests_answered_out_of_order_reach_their_callers() -> None:
    async with connected() as (client, guest):
        async def answer_in_reverse() -> None:
            reqs = [await guest.read_request() for _ in range(3)]
            assert len({r.id for r in reqs}) == 3
            for r in reversed(reqs):
                assert isinstance(r, gp.FileRead)
                await guest.respond(gp.FileData(id=r.id, data=r.path.encode(), eof=True,
                                                size=1))

        got: dict[str, bytes] = {}

        async def read(path: str) -> None:
            got[path] = (await client.read_file(path)).data

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_in_reverse)
                for path in ("/a", "/b", "/c"):
                    tg.start_soon(read, path)
    assert got == {p: p.encode() for p in ("/a", "/b", "/c")}


async def test_the_callers_message_is_not_mutated() -> None:
    seen: list[gp.GuestRequest] = []
    msg = gp.Ping(id=0)
    async with connected() as (client, guest), anyio.create_task_group() as tg:
        tg.start_soon(answer_pings, guest, seen)
        async with anyio.create_task_group() as calls:
            calls.start_soon(client.request, msg, gp.Pong)
            calls.start_soon(client.request, msg, gp.Pong)
        tg.cancel_scope.cancel()
    assert msg.id == 0
    assert len({r.id for r in seen}) == 2 and 0 not in {r.id for r in seen}


async def test_timeout_zero_fails_at_once_without_sending() -> None:
    seen: list[gp.GuestRequest] = []
    async with connected() as (client, guest), anyio.create_task_group() as tg:
        tg.start_soon(answer_pings, guest, seen)
        with anyio.fail_after(1), pytest.raises(RequestTimeout) as info:
            await client.ping(timeout=0)
        assert info.value.seconds == 0 and isinstance(info.value, RemoteTimeout)
        assert (await client.ping()).uptime_s == 7.0  # the session is fine
        tg.cancel_scope.cancel()
    assert [type(r) for r in seen] == [gp.Ping]


async def test_timeout_none_is_the_default_and_the_request_is_cancelled() -> None:
    async with connected(default_timeout=0.3) as (client, guest):
        t0 = anyio.current_time()
        with pytest.raises(RequestTimeout, match="ping sent to the guest agent") as info:
            await client.ping(timeout=None)
        assert info.value.seconds == 0.3 and 0.25 < anyio.current_time() - t0 < 3
        ping = await guest.read_request()
        cancel = await guest.read_request()  # the agent is told to stop
        assert isinstance(cancel, gp.Cancel) and cancel.target == ping.id


@pytest.mark.parametrize("bad", [-1, -0.5, math.inf, math.nan, True, "1"])
async def test_bad_timeouts_are_refused_before_sending(bad: Any) -> None:
    async with connected() as (client, _):
        with pytest.raises(InvalidArgument, match="timeout"):
            await client.ping(timeout=bad)
        with pytest.raises(InvalidArgument, match="timeout"):
            await client.job_list(timeout=bad)
        with pytest.raises(InvalidArgument, match="idle_timeout"):
            await client.upload_bytes(b"x", "/x", idle_timeout=bad)
        with pytest.raises(InvalidArgument, match="timeout"):
            await client.resync(timeout=bad)
    async with streams() as (host, _):
        with pytest.raises(InvalidArgument, match="hello_timeout"):
            async with GuestClient.connect(host, hello_timeout=bad):
                pass


Call = Callable[[GuestClient], Awaitable[object]]
BAD_ARGS: list[tuple[str, Call, str]] = [
    ("exec", lambda c: c.exec(["true"], env={"BAD KEY": "x"}), "env (key)"),
    ("exec", lambda c: c.exec(["true"], timeout_s=-1), "timeout_s"),
    ("job_start", lambda c: c.job_start(["true"], ring_bytes=1), "ring_bytes"),
    ("job_poll", lambda c: c.job_poll(1, max_bytes=10**12), "max_bytes"),
    ("file_read", lambda c: c.read_file("/x", length=gp.MAX_CHUNK + 1), "length"),
    ("file_read", lambda c: c.read_file("relative"), "path"),
    ("set_hostname", lambda c: c.set_hostname("bad\nname"), "hostname"),
    ("configure_network", lambda c: c.configure_network(address="10.0.0.2", prefix=99,
                                                        interface="eth0"), "prefix above"),
    ("set_env", lambda c: c.set_env({"1X": "y"}), "set (key)"),
    ("download", lambda c: c.download("/x", _discard, chunk_size=0), "chunk_size"),
]


async def _discard(data: bytes) -> None:
    pass


@pytest.mark.parametrize(("tag", "call", "field"), BAD_ARGS,
                         ids=[f"{t}-{f}" for t, _, f in BAD_ARGS])
async def test_typed_methods_check_bounds_before_sending(tag: str, call: Call, field: str) -> None:
    seen: list[gp.GuestRequest] = []
    async with connected() as (client, guest), anyio.create_task_group() as tg:
        tg.start_soon(answer_pings, guest, seen)
        with pytest.raises(InvalidArgument, match=rf"{tag}: (bad )?{re.escape(field)}") as info:
            await call(client)
        assert isinstance(info.value, InvalidRequest)  # code "invalid": the caller's fault
        await client.ping()
        tg.cancel_scope.cancel()
    assert [type(r) for r in seen] == [gp.Ping]  # nothing else was sent


async def test_a_relayed_channel_closing_names_the_relay() -> None:
    async with connected(hop=Hop.RELAY, peer="VM 'ws''s guest agent") as (client, guest):
        async def hang_up() -> None:
            await guest.read_request()
            await guest.stream.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_up)
            with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
                await client.ping()
    assert info.value.hop is Hop.RELAY and "relay to VM 'ws'" in str(info.value)


async def test_a_refusal_after_the_session_started_fails_later_requests() -> None:
    async with connected() as (client, guest):
        await guest.send(gp.GUEST_SYNC_MAGIC + encode_frame(gp.response_codec.encode(
            gp.Error(id=0, code=ErrorCode.PERMISSION_DENIED, message="bad secret"))))
        with anyio.fail_after(5):
            while True:
                try:
                    await client.ping(timeout=0.1)
                except RequestTimeout:
                    continue
                except ConnectionLost as exc:
                    assert isinstance(exc.__cause__, PermissionDenied)
                    break


# --- open_guest through a fake helper -----------------------------------------------------

HelperScript = Callable[["FakeRelay"], Awaitable[None]]


class FakeRelay:
    """The helper's end: helper frames until GuestOpened, then a fake guest."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(hp.HELPER_MAX_FRAME)
        self.ready: list[bytes] = []

    async def read(self) -> hp.HelperRequest:
        while not self.ready:
            self.ready = self.decoder.feed(await self.stream.receive())
        return hp.request_codec.decode(self.ready.pop(0))

    async def respond(self, msg: hp.HelperResponse, then: bytes = b"") -> None:
        await self.stream.send(encode_frame(hp.response_codec.encode(msg)) + then)

    async def greet(self) -> hp.GuestOpen:
        h = await self.read()
        await self.respond(hp.HelloOk(id=h.id, version=hp.HELPER_PROTOCOL_VERSION,
                                      server="fake", uptime_s=1.0))
        req = await self.read()
        assert isinstance(req, hp.GuestOpen)
        return req


@asynccontextmanager
async def fake_helper(tmp_path: Path, script: HelperScript) -> AsyncIterator[str]:
    path = str(tmp_path / "helper.sock")
    listener = await anyio.create_unix_listener(path)
    done = anyio.Event()

    async def serve() -> None:
        try:
            async with listener:
                stream = await listener.accept()
                async with stream:
                    await script(FakeRelay(stream))
                    while True:
                        await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the client hung up, or the script closed the connection
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        yield path
        # Let the fake see the hang-up rather than cancel it inside a Unix
        # socket read (anyio may then complete an already cancelled future).
        with anyio.move_on_after(5):
            await done.wait()
        tg.cancel_scope.cancel()


async def test_open_guest_relays_the_guest_stream_right_behind_guest_opened(
    tmp_path: Path,
) -> None:
    async def relay(h: FakeRelay) -> None:
        req = await h.greet()
        assert req.vm == "ws" and req.owner == 1000
        # The relay's greeting in the same write as GuestOpened: not a byte lost.
        await h.respond(hp.GuestOpened(id=req.id, vm=req.vm), then=hello(b"", session=1))
        guest = FakeGuest(h.stream)
        await guest.send(hello(await guest.read_sync(), session=2))
        ping = await guest.read_request()
        await guest.respond(gp.Pong(id=ping.id, uptime_s=3.0))

    async with fake_helper(tmp_path, relay) as path:
        with anyio.fail_after(5):
            async with open_guest(path, "ws", owner=1000, timeout=5) as g:
                assert g.hello is not None and g.hello.session == 2
                assert (await g.ping()).uptime_s == 3.0


async def test_open_guest_of_a_missing_vm_is_the_helpers_typed_refusal(tmp_path: Path) -> None:
    async def refuse(h: FakeRelay) -> None:
        req = await h.greet()
        await h.respond(hp.Error(id=req.id, code=ErrorCode.NOT_FOUND, message="no VM 'ws'"))

    async with fake_helper(tmp_path, refuse) as path:
        with anyio.fail_after(5), pytest.raises(NotFound, match="no VM"):
            async with open_guest(path, "ws"):
                pass


async def test_open_guest_never_lets_a_raw_timeout_out(tmp_path: Path) -> None:
    async def silent(h: FakeRelay) -> None:
        await h.greet()  # and never answers guest_open

    async with fake_helper(tmp_path, silent) as path:
        with anyio.fail_after(5), pytest.raises(RequestTimeout, match="guest_open sent to"):
            async with open_guest(path, "ws", timeout=0.3):
                pass

    async def no_hello(h: FakeRelay) -> None:
        req = await h.greet()
        await h.respond(hp.GuestOpened(id=req.id, vm=req.vm))  # but the agent never greets

    async with fake_helper(tmp_path, no_hello) as path:
        with anyio.fail_after(5), pytest.raises(RequestTimeout, match="VM 'ws'"):
            async with open_guest(path, "ws", timeout=0.3):
                pass


async def test_open_guest_without_a_helper_is_helper_unavailable(tmp_path: Path) -> None:
    with pytest.raises(HelperUnavailable, match="cannot connect"):
        async with open_guest(str(tmp_path / "missing.sock"), "ws"):
            pass

    async def garbage(h: FakeRelay) -> None:
        await h.read()
        await h.stream.send(b"\xff" * 64)

    async with fake_helper(tmp_path, garbage) as path:
        with anyio.fail_after(5), pytest.raises(HelperUnavailable, match="invalid frame"):
            async with open_guest(path, "ws"):
                pass


async def test_a_relay_closing_mid_request_is_connection_lost(tmp_path: Path) -> None:
    async def relay_then_drop(h: FakeRelay) -> None:
        req = await h.greet()
        await h.respond(hp.GuestOpened(id=req.id, vm=req.vm))
        guest = FakeGuest(h.stream)
        await guest.send(hello(await guest.read_sync()))
        await guest.read_request()
        await h.stream.aclose()

    async with fake_helper(tmp_path, relay_then_drop) as path:
        with anyio.fail_after(5):
            async with open_guest(path, "ws") as g:
                with pytest.raises(ConnectionLost) as info:
                    await g.ping()
    assert info.value.hop is Hop.RELAY
