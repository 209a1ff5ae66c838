"""HelperClient against a scripted fake helper on a Unix socket: each test
controls exactly what the "helper" answers, and when."""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from agentiso.frontend.errors import (
    ConnectionLost,
    HelperUnavailable,
    Hop,
    InvalidArgument,
    RequestTimeout,
)
from agentiso.frontend.helper_client import HelperClient, connect_helper
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import (
    ErrorCode,
    FrameTooLarge,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProtocolViolation,
    RemoteProtocolError,
    UnexpectedMessage,
)
from agentiso.protocol.framing import FrameDecoder, encode_frame

pytestmark = pytest.mark.anyio


class FakeHelper:
    """The helper's end of one connection: reads requests, writes frames."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(hp.HELPER_MAX_FRAME)
        self.ready: list[bytes] = []
        self.received: list[hp.HelperRequest] = []

    async def read(self) -> hp.HelperRequest:
        while not self.ready:
            self.ready = self.decoder.feed(await self.stream.receive())
        msg = hp.request_codec.decode(self.ready.pop(0))
        self.received.append(msg)
        return msg

    async def respond(self, msg: hp.HelperResponse) -> None:
        await self.stream.send(encode_frame(hp.response_codec.encode(msg)))

    async def greet(self) -> None:
        hello = await self.read()
        assert isinstance(hello, hp.Hello)
        await self.respond(hp.HelloOk(id=hello.id, version=hello.version, server="fake",
                                      uptime_s=1.0))


Script = Callable[[FakeHelper], Awaitable[None]]


@asynccontextmanager
async def fake_helper(tmp_path: Path, script: Script) -> AsyncIterator[str]:
    """A Unix socket whose first connection is handled by ``script``; then the
    fake reads until the client hangs up."""
    path = str(tmp_path / "helper.sock")
    listener = await anyio.create_unix_listener(path)
    done = anyio.Event()

    async def serve() -> None:
        try:
            async with listener:
                stream = await listener.accept()
                async with stream:
                    h = FakeHelper(stream)
                    await script(h)
                    while True:
                        await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the client hung up (or the script closed the connection)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        yield path
        # Let the fake see the client's hang-up rather than cancel it inside a
        # socket read: anyio's Unix socket stream can then complete a future
        # that is already cancelled (InvalidStateError in the loop's handler).
        with anyio.move_on_after(5):
            await done.wait()
        tg.cancel_scope.cancel()


@asynccontextmanager
async def connected(
    tmp_path: Path, script: Script, **kw: Any
) -> AsyncIterator[HelperClient]:
    async def run(h: FakeHelper) -> None:
        await h.greet()
        await script(h)

    async with fake_helper(tmp_path, run) as path, connect_helper(path, **kw) as client:
        yield client


async def nothing(h: FakeHelper) -> None:
    pass


# --- id multiplexing ------------------------------------------------------------------


async def test_concurrent_requests_answered_out_of_order_reach_their_callers(
    tmp_path: Path,
) -> None:
    async def answer_in_reverse(h: FakeHelper) -> None:
        reqs = [await h.read() for _ in range(3)]
        assert len({r.id for r in reqs}) == 3
        for r in reversed(reqs):
            assert isinstance(r, hp.VolumeGet)
            await h.respond(volume_info(r.id, r.name))

    got: dict[str, str] = {}
    async with connected(tmp_path, answer_in_reverse) as helper:
        async def get(name: str) -> None:
            got[name] = (await helper.volume_get(name=name)).name

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for name in ("a", "b", "c"):
                    tg.start_soon(get, name)
    assert got == {"a": "a", "b": "b", "c": "c"}


async def test_the_callers_message_is_not_mutated(tmp_path: Path) -> None:
    async def answer_both(h: FakeHelper) -> None:
        reqs = [await h.read() for _ in range(2)]
        assert reqs[0].id != reqs[1].id  # one message object, sent twice, two ids
        for r in reqs:
            await h.respond(hp.Pong(id=r.id))

    msg = hp.Ping(id=0)
    async with connected(tmp_path, answer_both) as helper, anyio.create_task_group() as tg:
        tg.start_soon(helper.request, msg)
        tg.start_soon(helper.request, msg)
    assert msg.id == 0


async def test_a_late_answer_is_dropped_and_the_connection_goes_on(tmp_path: Path) -> None:
    async def late_then_ok(h: FakeHelper) -> None:
        slow = await h.read()
        fast = await h.read()
        await h.respond(hp.Pong(id=slow.id))  # after the caller gave up on it
        await h.respond(hp.Identity(id=fast.id, uid=1, gid=1, pid=1, admin=False))

    async with connected(tmp_path, late_then_ok) as helper:
        with pytest.raises(RequestTimeout):
            await helper.ping(timeout=0.2)
        with anyio.fail_after(5):
            assert (await helper.whoami()).uid == 1


# --- the connection going away -----------------------------------------------------------


async def test_connection_lost_mid_request(tmp_path: Path) -> None:
    async def hang_up(h: FakeHelper) -> None:
        await h.read()
        await h.stream.aclose()

    async with connected(tmp_path, hang_up) as helper:
        with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
            await helper.ping()
        assert info.value.hop is Hop.HELPER_SOCKET
        assert not isinstance(info.value, HelperUnavailable)  # it had been connected
        assert info.value.code == ErrorCode.UNAVAILABLE
        assert "reconnect" in str(info.value)
        with pytest.raises(ConnectionLost):  # and every later request, at once
            await helper.whoami()


async def test_connection_level_error_fails_every_pending_request(tmp_path: Path) -> None:
    async def end_it(h: FakeHelper) -> None:
        await h.read()
        await h.read()
        await h.respond(hp.Error(id=0, code=ErrorCode.PROTOCOL, message="you broke it"))

    failures: list[BaseException] = []
    async with connected(tmp_path, end_it) as helper:
        async def ping() -> None:
            try:
                await helper.ping()
            except ConnectionLost as exc:
                failures.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ping)
                tg.start_soon(ping)
    assert len(failures) == 2 and failures[0] is not failures[1]
    for exc in failures:
        assert isinstance(exc.__cause__, ProtocolViolation)  # the helper says we broke it
        assert "you broke it" in str(exc)


async def test_a_typed_refusal_fails_only_its_request(tmp_path: Path) -> None:
    async def refuse_then_answer(h: FakeHelper) -> None:
        r = await h.read()
        await h.respond(hp.Error(id=r.id, code=ErrorCode.NOT_FOUND, message="no VM 'x'"))
        r = await h.read()
        await h.respond(hp.Pong(id=r.id))

    async with connected(tmp_path, refuse_then_answer) as helper:
        with pytest.raises(NotFound, match="no VM"):
            await helper.vm_get(name="x")
        await helper.ping()


async def test_an_unexpected_answer_type_is_a_protocol_error(tmp_path: Path) -> None:
    async def wrong(h: FakeHelper) -> None:
        r = await h.read()
        await h.respond(hp.Pong(id=r.id))

    async with connected(tmp_path, wrong) as helper:
        with pytest.raises(UnexpectedMessage, match="vms in answer to vm_list, got Pong"):
            await helper.vm_list()


async def test_an_undecodable_answer_fails_only_its_request(tmp_path: Path) -> None:
    async def garbage_then_ok(h: FakeHelper) -> None:
        r = await h.read()
        body = msgspec.msgpack.encode({"type": "pong", "id": r.id, "extra": 1})
        await h.stream.send(encode_frame(body))
        r = await h.read()
        await h.respond(hp.Pong(id=r.id))

    async with connected(tmp_path, garbage_then_ok) as helper:
        with pytest.raises(RemoteProtocolError, match="invalid answer"):
            await helper.ping()
        await helper.ping()


# --- connecting -------------------------------------------------------------------------


async def test_no_helper_socket_is_helper_unavailable(tmp_path: Path) -> None:
    with pytest.raises(HelperUnavailable, match=r"cannot connect.*; start the helper") as info:
        async with connect_helper(str(tmp_path / "missing.sock")):
            pass
    assert isinstance(info.value, ConnectionLost) and info.value.hop is Hop.HELPER_SOCKET


async def test_a_refusal_at_hello_is_typed(tmp_path: Path) -> None:
    async def refuse(h: FakeHelper) -> None:
        await h.respond(hp.Error(id=0, code=ErrorCode.PERMISSION_DENIED, message="not in group"))

    async with fake_helper(tmp_path, refuse) as path:
        with pytest.raises(PermissionDenied, match="not in group"):
            async with connect_helper(path):
                pass


async def test_a_helper_closing_during_hello_is_helper_unavailable(tmp_path: Path) -> None:
    async def close(h: FakeHelper) -> None:
        await h.read()
        await h.stream.aclose()

    async with fake_helper(tmp_path, close) as path:
        with pytest.raises(HelperUnavailable, match="closed the connection during hello"):
            async with connect_helper(path):
                pass


async def test_a_silent_helper_is_helper_unavailable(tmp_path: Path) -> None:
    async with fake_helper(tmp_path, nothing) as path:
        with anyio.fail_after(5), pytest.raises(HelperUnavailable, match="did not answer hello"):
            async with connect_helper(path, timeout=0.3):
                pass


# --- the frame cap ---------------------------------------------------------------------


def _oversize_header() -> bytes:
    """A frame header announcing one byte more than the helper protocol allows."""
    return (hp.HELPER_MAX_FRAME + 1).to_bytes(4, "big")


async def test_an_oversize_frame_from_the_helper_ends_the_connection_fast(
    tmp_path: Path
) -> None:
    async def answer_badly(h: FakeHelper) -> None:
        await h.read()
        await h.stream.send(_oversize_header())

    async with connected(tmp_path, answer_badly) as helper:
        # Refused from the header alone: the client never waits for 4 MiB.
        with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:
            await helper.ping()
        assert info.value.hop is Hop.HELPER_SOCKET
        assert not isinstance(info.value, HelperUnavailable)
        assert isinstance(info.value.__cause__, FrameTooLarge)
        assert "invalid frame" in str(info.value)
        with pytest.raises(ConnectionLost):
            await helper.whoami()  # the connection is done for


async def test_an_oversize_answer_to_hello_is_helper_unavailable(tmp_path: Path) -> None:
    async def answer_badly(h: FakeHelper) -> None:
        await h.read()
        await h.stream.send(_oversize_header())

    async with fake_helper(tmp_path, answer_badly) as path:
        with anyio.fail_after(5), pytest.raises(HelperUnavailable, match="invalid frame"):
            async with connect_helper(path):
                pass


def recorder(seen: list[hp.HelperRequest]) -> Callable[[FakeHelper], Awaitable[None]]:
    """A fake helper that records every request in ``seen`` and answers Pong."""

    async def record(h: FakeHelper) -> None:
        while True:
            r = await h.read()
            seen.append(r)
            await h.respond(hp.Pong(id=r.id))

    return record


async def test_a_request_above_the_frame_cap_is_refused_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[hp.HelperRequest] = []
    record = recorder(seen)

    async with connected(tmp_path, record) as helper:
        # No request within its bounds reaches the real 4 MiB cap: lower the cap.
        monkeypatch.setattr(hp, "HELPER_MAX_FRAME", 48)
        big = hp.VolumeCreate(id=0, name="a-volume-with-a-long-name",
                              source=hp.FromImage(image="minimal"))
        with pytest.raises(InvalidArgument, match="volume_create: the request is too large"):
            await helper.request(big)
        monkeypatch.undo()
        await helper.ping()  # the connection is fine
    assert [type(r) for r in seen] == [hp.Ping], "the oversize request was never sent"


# --- timeouts ---------------------------------------------------------------------------


async def test_timeout_zero_fails_at_once_without_sending(tmp_path: Path) -> None:
    seen: list[hp.HelperRequest] = []
    record = recorder(seen)

    async with connected(tmp_path, record) as helper:
        with anyio.fail_after(1), pytest.raises(RequestTimeout) as info:
            await helper.ping(timeout=0)
        assert info.value.seconds == 0 and info.value.code == ErrorCode.TIMEOUT
        await helper.ping()  # the connection is fine
    assert [type(r) for r in seen] == [hp.Ping]


async def test_timeout_none_is_the_default(tmp_path: Path) -> None:
    async with connected(tmp_path, nothing, default_timeout=0.3) as helper:
        t0 = anyio.current_time()
        with pytest.raises(RequestTimeout, match="ping sent to the agentiso helper") as info:
            await helper.ping(timeout=None)
        assert info.value.seconds == 0.3
        assert 0.25 < anyio.current_time() - t0 < 3


@pytest.mark.parametrize("bad", [-1, -0.001, math.inf, math.nan, True, "5"])
async def test_bad_timeouts_are_refused_before_sending(tmp_path: Path, bad: Any) -> None:
    async with connected(tmp_path, nothing) as helper:
        with pytest.raises(InvalidArgument, match="timeout"):
            await helper.ping(timeout=bad)
        with pytest.raises(InvalidRequest, match="timeout"):  # InvalidArgument is one
            await helper.request(hp.Ping(id=0), timeout=bad)


async def test_hello_and_guest_open_are_not_requests_of_an_open_session(tmp_path: Path) -> None:
    async with connected(tmp_path, nothing) as helper:
        for msg in (hp.Hello(id=0, version=1), hp.GuestOpen(id=0, vm="ws")):
            with pytest.raises(InvalidArgument, match="open helper session"):
                await helper.request(msg)


# --- typed methods ------------------------------------------------------------------------


def volume_info(rid: int, name: str) -> hp.VolumeInfo:
    return hp.VolumeInfo(id=rid, name=name, size_bytes=1 << 30, used_bytes=0, created=1.0,
                         origin="image:minimal")


def vm_info(rid: int, name: str) -> hp.VmInfo:
    return hp.VmInfo(id=rid, name=name, volume="v", state="running", vcpus=1, memory_mib=256,
                     created=1.0)


#: method, its arguments, what the helper answers (by id), what the method returns.
CASES: list[tuple[str, dict[str, Any], Callable[[int], hp.HelperResponse], type | None]] = [
    ("ping", {}, lambda i: hp.Pong(id=i), None),
    ("whoami", {}, lambda i: hp.Identity(id=i, uid=0, gid=0, pid=1, admin=True), hp.Identity),
    ("image_list", {}, lambda i: hp.Images(id=i, images=[]), hp.Images),
    ("volume_create", {"name": "v", "source": hp.FromImage(image="minimal")},
     lambda i: volume_info(i, "v"), hp.VolumeInfo),
    ("volume_destroy", {"name": "v"}, lambda i: hp.Done(id=i), None),
    ("volume_get", {"name": "v"}, lambda i: volume_info(i, "v"), hp.VolumeInfo),
    ("volume_list", {}, lambda i: hp.Volumes(id=i, volumes=[]), hp.Volumes),
    ("volume_grow", {"name": "v", "size_bytes": 2 << 30}, lambda i: volume_info(i, "v"),
     hp.VolumeInfo),
    ("snapshot_create", {"volume": "v", "snapshot": "s"}, lambda i: volume_info(i, "v"),
     hp.VolumeInfo),
    ("snapshot_rollback", {"volume": "v", "snapshot": "s"}, lambda i: volume_info(i, "v"),
     hp.VolumeInfo),
    ("snapshot_delete", {"volume": "v", "snapshot": "s"}, lambda i: hp.Done(id=i), None),
    ("vm_start", {"name": "m", "volume": "v"}, lambda i: vm_info(i, "m"), hp.VmInfo),
    ("vm_stop", {"name": "m"}, lambda i: hp.Done(id=i), None),
    ("vm_get", {"name": "m"}, lambda i: vm_info(i, "m"), hp.VmInfo),
    ("vm_list", {}, lambda i: hp.Vms(id=i, vms=[]), hp.Vms),
    ("vm_console", {"name": "m"}, lambda i: hp.ConsoleText(id=i, text="boot"), hp.ConsoleText),
    ("vm_network_set", {"name": "m", "policy": hp.NetworkPolicy(egress=True)},
     lambda i: vm_info(i, "m"), hp.VmInfo),
    ("forward_add", {"vm": "m", "host_port": 8080, "guest_port": 80},
     lambda i: vm_info(i, "m"), hp.VmInfo),
    ("forward_remove", {"vm": "m", "host_port": 8080}, lambda i: vm_info(i, "m"), hp.VmInfo),
    ("admin_list", {}, lambda i: hp.AdminListing(id=i, volumes=[], vms=[]), hp.AdminListing),
    ("gc", {}, lambda i: hp.GcReport(id=i, dry_run=True, orphans=[]), hp.GcReport),
]

#: The requests that are not typed methods: Hello (connect_helper sends it)
#: and GuestOpen (open_guest turns a connection into a guest channel).
NOT_METHODS = {hp.Hello, hp.GuestOpen}


def request_types() -> dict[str, type[msgspec.Struct]]:
    out: dict[str, type[msgspec.Struct]] = {}
    for cls in hp.HelperRequest.__args__:  # type: ignore[attr-defined]
        if cls not in NOT_METHODS:
            tag = cls.__struct_config__.tag
            assert isinstance(tag, str)
            out[tag] = cls
    return out


def test_every_helper_request_has_a_typed_method_with_its_fields() -> None:
    types = request_types()
    assert sorted(types) == sorted(name for name, *_ in CASES)
    for tag, cls in types.items():
        params = inspect.signature(getattr(HelperClient, tag)).parameters
        assert params["timeout"].default is None and params["owner"].default is None
        fields = {f.name: f for f in msgspec.structs.fields(cls) if f.name != "id"}
        assert set(params) - {"self", "timeout"} == set(fields), tag
        for name, f in fields.items():
            p = params[name]
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (tag, name)
            if f.required:
                assert p.default is inspect.Parameter.empty, (tag, name)
            else:  # the method's default is the message's
                default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                assert p.default == default, (tag, name)


@pytest.mark.parametrize(("method", "kwargs", "answer", "returns"), CASES,
                         ids=[c[0] for c in CASES])
async def test_typed_method_sends_its_request_and_returns_the_answer(
    tmp_path: Path, method: str, kwargs: dict[str, Any],
    answer: Callable[[int], hp.HelperResponse], returns: type | None,
) -> None:
    seen: list[hp.HelperRequest] = []

    async def serve(h: FakeHelper) -> None:
        r = await h.read()
        seen.append(r)
        await h.respond(answer(r.id))

    async with connected(tmp_path, serve) as helper:
        got = await getattr(helper, method)(owner=1000, timeout=5, **kwargs)
    want = request_types()[method](id=0, **kwargs)
    (sent,) = seen
    assert type(sent) is type(want) and sent.owner == 1000
    assert msgspec.structs.replace(sent, id=0, owner=None) == want
    if returns is None:
        assert got is None
    else:
        assert isinstance(got, returns)


BAD_ARGS: list[tuple[str, dict[str, Any], str]] = [
    ("image_list", {"owner": -1}, "owner"),
    ("volume_create", {"name": "Bad Name", "source": hp.FromImage(image="minimal")}, "name"),
    ("volume_create", {"name": "v", "source": hp.FromImage(image="x/y")}, "source.image"),
    ("volume_grow", {"name": "v", "size_bytes": 1}, "size_bytes"),
    ("snapshot_create", {"volume": "v", "snapshot": "-x"}, "snapshot"),
    ("vm_start", {"name": "m", "volume": "v", "vcpus": 0}, "vcpus"),
    ("vm_start", {"name": "m", "volume": "v", "memory_mib": 10**9}, "memory_mib"),
    ("vm_stop", {"name": "m", "timeout_s": -1.0}, "timeout_s"),
    ("vm_console", {"name": "m", "max_bytes": 10**9}, "max_bytes"),
    ("vm_network_set", {"name": "m", "policy": hp.NetworkPolicy(peers=["p"] * 65)},
     "policy.peers"),
    ("forward_add", {"vm": "m", "host_port": 0, "guest_port": 80}, "host_port"),
    ("forward_remove", {"vm": "m", "host_port": 70000}, "host_port"),
    ("gc", {"dry_run": "yes"}, "dry_run"),
]


@pytest.mark.parametrize(("method", "kwargs", "field"), BAD_ARGS,
                         ids=[f"{m}-{f}" for m, _, f in BAD_ARGS])
async def test_typed_methods_check_bounds_before_sending(
    tmp_path: Path, method: str, kwargs: dict[str, Any], field: str,
) -> None:
    async def answer_pings(h: FakeHelper) -> None:
        while True:
            r = await h.read()
            assert isinstance(r, hp.Ping), f"sent {r!r}"
            await h.respond(hp.Pong(id=r.id))

    async with connected(tmp_path, answer_pings) as helper:
        with pytest.raises(InvalidArgument, match=f"{method}: bad {field}:"):
            await getattr(helper, method)(**kwargs)
        await helper.ping()  # nothing was sent, and the connection is fine
