"""The helper's guest relay against the real guest agent (run as a local
process on a unix socket), and against a hostile guest.

Clients speak raw guest-protocol frames over socketpairs, exactly what a
relayed helper connection carries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import ByteStream, UNIXSocketStream

from agentiso.privhelper.errors import GuestStepFailed, HelperError
from agentiso.privhelper.limits import BufferBudget
from agentiso.privhelper.relay import GuestChannel
from agentiso.privhelper.relay_sinks import RelayLimits
from agentiso.privhelper.transport import receive_some
from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.framing import encode_frame

pytestmark = pytest.mark.anyio


class Agent:
    """The real agent as a subprocess serving ``path``; restartable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentiso.guest", "--unix", str(self.path)],
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def agent() -> Iterator[Agent]:
    d = Path(tempfile.mkdtemp(prefix="agentiso-relay-"))
    a = Agent(d / "agent.sock")
    a.start()
    try:
        yield a
    finally:
        a.stop()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def connector(path: Path) -> Any:
    async def connect() -> ByteStream:
        return await anyio.connect_unix(path)

    return connect


class Client:
    """A relayed client: raw guest frames over one end of a socketpair."""

    def __init__(self, stream: UNIXSocketStream) -> None:
        self.stream = stream
        self.decoder = gp.GuestStreamDecoder(gp.GUEST_MAX_FRAME)
        self.pending: list[Any] = []

    async def send(self, msg: Any) -> None:
        await self.stream.send(encode_frame(gp.request_codec.encode(msg)))

    async def sync(self) -> gp.Hello:
        """The host side of the handshake: marker + nonce, wait for the echo."""
        nonce = os.urandom(gp.SYNC_NONCE_LEN)
        await self.stream.send(gp.HOST_SYNC_MAGIC + nonce)
        while True:
            msg = await self.recv()
            if isinstance(msg, gp.Hello) and msg.sync_nonce == nonce:
                return msg

    async def recv(self) -> Any:
        while not self.pending:
            data = await self.stream.receive(65536)
            for item in self.decoder.feed(data):
                if item is not None:
                    self.pending.append(gp.response_codec.decode(item))
        return self.pending.pop(0)

    async def until_final(self, rid: int) -> Any:
        while True:
            msg = await self.recv()
            if msg.id == rid and not isinstance(msg, (gp.ExecOutput, gp.DownloadChunk)):
                return msg


@asynccontextmanager
async def relayed_client(
    channel: GuestChannel, limits: RelayLimits | None = None
) -> AsyncIterator[Client]:
    a, b = socket.socketpair()
    server_side = await UNIXSocketStream.from_socket(a)
    client_side = await UNIXSocketStream.from_socket(b)

    async def receive() -> bytes:
        return await receive_some(server_side)

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            partial(channel.serve_client, limits=limits or RelayLimits()), receive,
            server_side.send,
        )
        client = Client(client_side)
        await client.sync()
        try:
            yield client
        finally:
            await client_side.aclose()
    await server_side.aclose()


@asynccontextmanager
async def running_channel(path: Path) -> AsyncIterator[GuestChannel]:
    ch = GuestChannel(name="t", connect=connector(path))
    async with anyio.create_task_group() as tg:
        tg.start_soon(ch.run)
        await ch.wait_ready(20)
        try:
            yield ch
        finally:
            tg.cancel_scope.cancel()


def _exec(rid: int, cmd: str) -> gp.Exec:
    return gp.Exec(id=rid, shell=cmd)


async def test_requests_of_many_clients_are_routed_back_by_their_own_ids(agent: Agent) -> None:
    async with running_channel(agent.path) as ch:
        async with relayed_client(ch) as c1, relayed_client(ch) as c2:
            # Both clients use the same request ids: the relay must not mix them up.
            await c1.send(_exec(1, "echo one"))
            await c2.send(_exec(1, "echo two"))
            r1, r2 = await c1.until_final(1), await c2.until_final(1)
            assert isinstance(r1, gp.ExecResult) and r1.stdout == b"one\n"
            assert isinstance(r2, gp.ExecResult) and r2.stdout == b"two\n"
        assert ch.connects == 1


async def test_a_slow_request_does_not_block_others(agent: Agent) -> None:
    async with running_channel(agent.path) as ch, relayed_client(ch) as c:
        # The exec cannot end before the ping is answered however loaded the
        # host is: it ends only when cancelled, after the ping's answer.
        await c.send(_exec(1, "sleep 600; echo slow"))
        await c.send(gp.Ping(id=2))
        with anyio.fail_after(30):
            first = await c.recv()
        assert isinstance(first, gp.Pong) and first.id == 2
        await c.send(gp.Cancel(id=3, target=1))
        with anyio.fail_after(30):
            slow = await c.until_final(1)
        assert not isinstance(slow, gp.ExecResult) or slow.stdout != b"slow\n"


async def test_helper_internal_calls_share_the_channel(agent: Agent) -> None:
    async with running_channel(agent.path) as ch, relayed_client(ch) as c:
        await c.send(_exec(7, "sleep 1; echo x"))
        pong = await ch.call(gp.Ping(id=0), timeout=5)
        assert isinstance(pong, gp.Pong)
        assert (await c.until_final(7)).stdout == b"x\n"


async def test_a_guest_refusal_is_a_guest_failure_never_the_helpers_own_code(
    agent: Agent,
) -> None:
    """The agent (not PID 1 here) refuses SetHostname with permission_denied:
    the helper must not answer its client permission_denied as if the helper
    had refused; the guest's code and text travel in the message."""
    async with running_channel(agent.path) as ch:
        with pytest.raises(GuestStepFailed) as info:
            await ch.call(gp.SetHostname(id=0, hostname="box"), 5)
    err = info.value
    assert err.code is ErrorCode.GUEST_FAILED
    assert err.guest_code == ErrorCode.PERMISSION_DENIED
    assert err.step == "SetHostname"
    assert "the guest failed SetHostname" in err.message
    assert "[permission_denied]" in err.message and "PID 1" in err.message


async def test_a_relay_side_failure_is_the_helpers_not_the_guests(agent: Agent) -> None:
    """The channel dropping under a helper call is the relay's failure
    (unavailable), not something the guest answered."""
    async with running_channel(agent.path) as ch, anyio.create_task_group() as tg:

        async def kill_soon() -> None:
            await anyio.sleep(0.5)
            agent.stop()

        tg.start_soon(kill_soon)
        with pytest.raises(HelperError) as info:
            await ch.call(gp.Exec(id=0, shell="sleep 30"), 20)
    assert not isinstance(info.value, GuestStepFailed)
    assert info.value.code is ErrorCode.UNAVAILABLE


async def test_client_garbage_gets_typed_error_and_relay_goes_on(agent: Agent) -> None:
    async with running_channel(agent.path) as ch, relayed_client(ch) as c:
        await c.stream.send(encode_frame(b"\xc1garbage"))
        await c.stream.send(encode_frame(msgspec.msgpack.encode({"type": "exec", "id": 5})))
        await c.send(gp.Auth(id=6, secret=b"x" * 16))
        errs = [await c.recv() for _ in range(3)]
        assert all(isinstance(e, gp.Error) for e in errs)
        assert {e.id for e in errs} == {0, 5, 6}
        await c.send(gp.Ping(id=9))
        assert isinstance(await c.recv(), gp.Pong)


async def test_channel_drop_fails_in_flight_and_retries_idempotent(agent: Agent) -> None:
    async with running_channel(agent.path) as ch, relayed_client(ch) as c:
        await c.send(_exec(1, "sleep 30"))
        await anyio.sleep(0.5)
        agent.stop()  # the agent dies with the exec in flight
        failed = await c.until_final(1)
        assert isinstance(failed, gp.Error) and failed.code == "unavailable"
        await c.send(gp.Ping(id=2))  # idempotent: queued until the channel is back
        agent.start()
        with anyio.fail_after(20):
            pong = await c.recv()
        assert isinstance(pong, gp.Pong) and pong.id == 2
        await c.send(_exec(3, "echo back"))
        assert (await c.until_final(3)).stdout == b"back\n"
        assert ch.connects == 2


async def test_disconnecting_client_cancels_its_requests_in_the_guest(agent: Agent) -> None:
    async with running_channel(agent.path) as ch:
        async with relayed_client(ch) as c:
            await c.send(gp.JobStart(id=1, argv=["sleep", "1001"]))
            started = await c.recv()
            assert isinstance(started, gp.JobStarted)
            await c.send(gp.Exec(id=2, argv=["sleep", "1002"]))
            await anyio.sleep(0.3)
        # The exec was cancelled in the guest; the background job lives on.
        count = "ps -eo args | grep -cx 'sleep {}' || true"
        with anyio.fail_after(10):
            while True:
                r = await ch.call(gp.Exec(id=0, shell=count.format(1002)), 5)
                if r.stdout.strip() == b"0":
                    break
                await anyio.sleep(0.2)
        r = await ch.call(gp.Exec(id=0, shell=count.format(1001)), 5)
        assert r.stdout.strip() == b"1"
        await ch.call(gp.JobKill(id=0, job=started.job, signal=9), 5)


async def test_hostile_guest_cannot_crash_the_relay(tmp_path: Path) -> None:
    """A guest that sends garbage, then an oversize frame, loses its channel;
    the relay reconnects and never raises."""
    path = Path(tempfile.mkdtemp(prefix="agentiso-hostile-")) / "g.sock"
    hello = gp.Hello(
        id=0, version=gp.GUEST_PROTOCOL_VERSION, agent="evil", transport="unix",
        boot=gp.BootTimings(init_t0=None, agent_start=0, listen=0, hello=0),
        max_frame=gp.GUEST_MAX_FRAME, max_chunk=gp.MAX_CHUNK, max_inflight=1, session=1,
        pid1=False,
    )
    connections = 0

    async def evil(stream: ByteStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            # Wait for the host's marker and echo its nonce, like the agent.
            buf = b""
            while len(buf) < len(gp.HOST_SYNC_MAGIC) + gp.SYNC_NONCE_LEN:
                buf += await stream.receive()
            nonce = buf[len(gp.HOST_SYNC_MAGIC):][: gp.SYNC_NONCE_LEN]
            greeting = msgspec.structs.replace(hello, sync_nonce=nonce)
            await stream.send(os.urandom(5000) + gp.GUEST_SYNC_MAGIC)
            await stream.send(encode_frame(gp.response_codec.encode(greeting)))
            await stream.send(encode_frame(os.urandom(300)))  # garbage frame
            await stream.send(b"\xff\xff\xff\xff")  # oversize length prefix
            await anyio.sleep(5)

    listener = await anyio.create_unix_listener(path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, evil)
            ch = GuestChannel(name="evil", connect=connector(path))
            tg.start_soon(ch.run)
            with anyio.fail_after(20):
                while connections < 3:
                    await anyio.sleep(0.05)
            assert ch.garbage_frames >= 1
            tg.cancel_scope.cancel()
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


async def test_a_resent_sync_marker_does_not_reset_the_session(agent: Agent) -> None:
    """A client resends its marker until answered; the repeat must not cancel
    the requests it sent after the first answer."""
    async with running_channel(agent.path) as ch, relayed_client(ch) as c:
        nonce = os.urandom(gp.SYNC_NONCE_LEN)
        await c.stream.send(gp.HOST_SYNC_MAGIC + nonce)
        while not (isinstance(h := await c.recv(), gp.Hello) and h.sync_nonce == nonce):
            pass
        await c.send(_exec(1, "sleep 1; echo done"))
        await c.stream.send(gp.HOST_SYNC_MAGIC + nonce)  # the late repeat
        result = await c.until_final(1)
        assert isinstance(result, gp.ExecResult) and result.stdout == b"done\n"


@pytest.fixture
def secret_agent() -> Iterator[Path]:
    """The real agent demanding a secret first, as it does on vsock."""
    d = Path(tempfile.mkdtemp(prefix="agentiso-secret-"))
    (d / "secret").write_bytes(b"s" * 32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentiso.guest", "--unix", str(d / "agent.sock"),
         "--secret-file", str(d / "secret")],
        stderr=subprocess.DEVNULL,
    )
    try:
        yield d / "agent.sock"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(d)


async def test_vsock_style_secret_is_sent_first_and_checked(secret_agent: Path) -> None:
    """With the right secret the relay gets its Hello; with a wrong one the
    channel never comes up."""
    good = GuestChannel(name="good", connect=connector(secret_agent), secret=b"s" * 32)
    bad = GuestChannel(name="bad", connect=connector(secret_agent), secret=b"x" * 32)
    async with anyio.create_task_group() as tg:
        tg.start_soon(good.run)
        tg.start_soon(bad.run)
        await good.wait_ready(20)
        assert isinstance(await good.call(gp.Ping(id=0), 5), gp.Pong)
        await anyio.sleep(2)
        assert not bad.ready
        tg.cancel_scope.cancel()


# --- bounded memory: caps on queues, in-flight requests and input ----------------------


def _markers(n: int) -> bytes:
    """``n`` host sync markers, each with its own nonce (each starts a session)."""
    return b"".join(gp.HOST_SYNC_MAGIC + os.urandom(gp.SYNC_NONCE_LEN) for _ in range(n))


async def _serve_unread(
    ch: GuestChannel, payload: bytes, budget: BufferBudget, limits: RelayLimits, uid: int = 1000
) -> tuple[str | None, float]:
    """Relay a client that sends ``payload`` and never reads; returns why it
    was dropped and how long the relay took to end."""
    a, b = socket.socketpair()
    server_side = await UNIXSocketStream.from_socket(a)
    client_side = await UNIXSocketStream.from_socket(b)

    async def receive() -> bytes:
        return await receive_some(server_side)

    async def flood() -> None:
        with contextlib.suppress(Exception):  # the relay stops reading once it drops us
            await client_side.send(payload)

    reason: str | None = None
    start = anyio.current_time()
    async with client_side, server_side, anyio.create_task_group() as tg:
        tg.start_soon(flood)
        with anyio.fail_after(30):
            reason = await ch.serve_client(
                receive, server_side.send, uid=uid, budget=budget, limits=limits
            )
        tg.cancel_scope.cancel()
    return reason, anyio.current_time() - start


async def test_a_never_reading_client_flooding_sync_markers_is_dropped(agent: Agent) -> None:
    """Every marker is answered by a greeting; greetings go through the same
    capped queue as frames, so a client that never reads is dropped once its
    queue is full, and everything it held is given back."""
    budget = BufferBudget(total=64 << 20, per_uid=64 << 20)
    limits = RelayLimits(queue_bytes=256 << 10)
    async with running_channel(agent.path) as ch:
        reason, took = await _serve_unread(ch, _markers(50_000), budget, limits)
        assert reason is not None and "not reading" in reason and str(256 << 10) in reason
        assert took < 20
        assert budget.used == 0
        # The channel and other clients are untouched.
        async with relayed_client(ch) as c:
            await c.send(gp.Ping(id=1))
            assert isinstance(await c.recv(), gp.Pong)


async def test_a_client_over_its_uids_buffer_share_is_dropped(agent: Agent) -> None:
    budget = BufferBudget(total=64 << 20, per_uid=100 << 10)
    limits = RelayLimits(queue_bytes=32 << 20)
    async with running_channel(agent.path) as ch:
        reason, _ = await _serve_unread(ch, _markers(50_000), budget, limits, uid=4242)
        assert reason is not None and "uid 4242" in reason and "share" in reason
        assert budget.used == 0


async def test_a_partial_frame_is_held_against_the_budget(agent: Agent) -> None:
    """A client announcing a 4 MiB frame and sending 1 MiB of it holds that
    input in the relay: over its share, it is dropped."""
    budget = BufferBudget(total=64 << 20, per_uid=512 << 10)
    head = struct.pack(">I", gp.GUEST_MAX_FRAME - 16)
    async with running_channel(agent.path) as ch:
        reason, _ = await _serve_unread(ch, head + b"\0" * (1 << 20), budget, RelayLimits())
        assert reason is not None and "share is 524288" in reason
        assert budget.used == 0


async def test_requests_in_flight_are_capped_per_client_and_per_vm(agent: Agent) -> None:
    limits = RelayLimits(max_inflight=2, max_inflight_per_vm=3)
    async with running_channel(agent.path) as ch:

        async def open_client(stack: contextlib.AsyncExitStack) -> Client:
            return await stack.enter_async_context(relayed_client(ch, limits=limits))

        async with contextlib.AsyncExitStack() as stack:
            c1, c2 = await open_client(stack), await open_client(stack)
            # Each client's Hello says what it may have in flight.
            assert (await c1.sync()).max_inflight == 2
            for rid in (1, 2, 3):
                await c1.send(_exec(rid, "sleep 600"))
            refused = await c1.recv()
            assert isinstance(refused, gp.Error) and refused.id == 3
            assert refused.code == ErrorCode.LIMIT_EXCEEDED and "this connection" in refused.message
            await c2.send(_exec(1, "sleep 600"))
            await c2.send(_exec(2, "sleep 600"))
            refused = await c2.recv()
            assert isinstance(refused, gp.Error) and refused.id == 2
            assert "in flight to VM" in refused.message and "limit is 3" in refused.message
            # The helper's own calls are never refused for the clients' load.
            assert isinstance(await ch.call(gp.Ping(id=0), 10), gp.Pong)
            # A cancelled request frees its slot.
            await c1.send(gp.Cancel(id=9, target=1))
            await c1.until_final(1)
            await c1.send(_exec(4, "echo again"))
            assert (await c1.until_final(4)).stdout == b"again\n"
        # By default: the agent's 64 slots less the helper's reserve of 8.
        async with relayed_client(ch) as c3:
            assert (await c3.sync()).max_inflight == 56


async def test_a_guest_that_stops_reading_loses_its_channel_not_the_helper(
    tmp_path: Path,
) -> None:
    """A guest that greets, then never reads: a write that cannot finish in
    ``write_timeout_s`` breaks the channel (its stream may hold part of a
    frame), requests in flight fail ``unavailable``, and the channel is
    re-established."""
    path = Path(tempfile.mkdtemp(prefix="agentiso-deaf-")) / "g.sock"
    hello = gp.Hello(
        id=0, version=gp.GUEST_PROTOCOL_VERSION, agent="deaf", transport="unix",
        boot=gp.BootTimings(init_t0=None, agent_start=0, listen=0, hello=0),
        max_frame=gp.GUEST_MAX_FRAME, max_chunk=gp.MAX_CHUNK, max_inflight=64, session=1,
        pid1=False,
    )
    connections = 0

    async def deaf(stream: ByteStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            buf = b""
            while len(buf) < len(gp.HOST_SYNC_MAGIC) + gp.SYNC_NONCE_LEN:
                buf += await stream.receive()
            nonce = buf[len(gp.HOST_SYNC_MAGIC):][: gp.SYNC_NONCE_LEN]
            greeting = msgspec.structs.replace(hello, sync_nonce=nonce)
            await stream.send(gp.GUEST_SYNC_MAGIC)
            await stream.send(encode_frame(gp.response_codec.encode(greeting)))
            await anyio.sleep(3600)  # never reads again

    listener = await anyio.create_unix_listener(path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, deaf)
            ch = GuestChannel(name="deaf", connect=connector(path), write_timeout_s=1.0)
            tg.start_soon(ch.run)
            await ch.wait_ready(20)
            async with relayed_client(ch) as c:
                chunk = b"x" * gp.MAX_CHUNK
                for rid in range(1, 17):  # 16 MiB: far more than the socket buffers
                    await c.send(gp.FileWrite(id=rid, path="/tmp/f", data=chunk))
                with anyio.fail_after(20):
                    failed = await c.recv()
                assert isinstance(failed, gp.Error) and failed.code == ErrorCode.UNAVAILABLE
            with anyio.fail_after(20):
                while connections < 2:
                    await anyio.sleep(0.05)
            await ch.wait_ready(20)  # re-established
            tg.cancel_scope.cancel()
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


async def test_a_dropped_client_that_reads_late_gets_the_reason(agent: Agent) -> None:
    """The client stops reading until the relay stops reading it (dropped);
    read then, everything queued arrives, ending with a ``limit_exceeded``
    error that says why, and the end of the stream."""
    limits = RelayLimits(queue_bytes=128 << 10)
    async with running_channel(agent.path) as ch:
        a, b = socket.socketpair()
        server_side = await UNIXSocketStream.from_socket(a)
        client_side = await UNIXSocketStream.from_socket(b)

        async def receive() -> bytes:
            return await receive_some(server_side)

        reason: str | None = None

        async def relay() -> None:
            nonlocal reason
            reason = await ch.serve_client(receive, server_side.send, limits=limits)
            await server_side.aclose()

        async with client_side, anyio.create_task_group() as tg:
            tg.start_soon(relay)
            with anyio.fail_after(30):
                while True:  # until a send blocks: the relay no longer reads us
                    with anyio.move_on_after(0.5) as blocked:
                        await client_side.send(_markers(1000))
                    if blocked.cancelled_caught:
                        break
            client = Client(client_side)
            last: Any = None
            # The end: EOF, or a reset (the relay closed with our markers unread).
            ended = (anyio.EndOfStream, anyio.BrokenResourceError)
            with anyio.fail_after(30), contextlib.suppress(*ended):
                while True:
                    last = await client.recv()
    assert reason is not None and "not reading" in reason
    assert isinstance(last, gp.Error) and last.id == 0
    assert last.code == ErrorCode.LIMIT_EXCEEDED and reason in last.message
