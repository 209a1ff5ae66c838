"""The guest channel's session handshake (protocol/guest_session.py), both sides."""

from __future__ import annotations

import itertools

import pytest

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ErrorCode, PermissionDenied, VersionMismatch
from agentiso.protocol.guest_session import AgentSync, HostSync, SessionStart, greeting
from agentiso.protocol.guest_stream import GuestStreamDecoder, HostMarker, HostStreamDecoder


def hello(nonce: bytes = b"", session: int = 1, version: int = gp.GUEST_PROTOCOL_VERSION
          ) -> gp.Hello:
    return gp.Hello(
        id=0, version=version, agent="t", transport="socketpair",
        boot=gp.BootTimings(init_t0=None, agent_start=0.0, listen=0.0, hello=0.0),
        max_frame=gp.GUEST_MAX_FRAME, max_chunk=gp.MAX_CHUNK, max_inflight=4,
        session=session, pid1=False, sync_nonce=nonce,
    )


def counting_tokens() -> HostSync:
    n = itertools.count(1)
    return HostSync(token=lambda size: next(n).to_bytes(size, "big"))


def test_host_ignores_every_hello_but_the_echo_of_its_marker() -> None:
    sync = counting_tokens()
    marker = sync.start()
    nonce = marker[len(gp.HOST_SYNC_MAGIC):]
    assert sync.awaiting and sync.marker == marker
    assert sync.on_hello(hello(b"", session=1)) is None  # unprompted, from before
    assert sync.on_hello(hello(b"12345678", session=2)) is None  # someone else's
    assert sync.on_hello(hello(nonce, session=3)) is SessionStart.ANSWERED
    assert not sync.awaiting and sync.hello is not None and sync.hello.session == 3


def test_host_in_a_session_ignores_regreetings_and_sees_a_restart() -> None:
    sync = counting_tokens()
    nonce = sync.start()[len(gp.HOST_SYNC_MAGIC):]
    sync.on_hello(hello(nonce, session=5))
    assert sync.on_hello(hello(b"", session=5)) is None  # a virtio flap
    assert sync.on_hello(hello(nonce, session=5)) is None  # late answer to a resent marker
    assert sync.on_hello(hello(b"", session=9)) is SessionStart.RESTARTED
    assert sync.hello is not None and sync.hello.session == 9


def test_restarting_the_handshake_takes_a_fresh_nonce() -> None:
    sync = counting_tokens()
    first = sync.start()
    second = sync.start()
    assert first != second and sync.hello is None
    assert sync.on_hello(hello(first[len(gp.HOST_SYNC_MAGIC):])) is None


def test_a_session_in_another_version_is_refused() -> None:
    sync = counting_tokens()
    nonce = sync.start()[len(gp.HOST_SYNC_MAGIC):]
    with pytest.raises(VersionMismatch):
        sync.on_hello(hello(nonce, version=99))
    with pytest.raises(VersionMismatch):
        HostSync().on_hello(hello(b"", version=99))


def test_marker_needs_a_handshake() -> None:
    with pytest.raises(RuntimeError):
        _ = HostSync().marker


def test_connection_refusal_is_only_permission_denied_on_id_0() -> None:
    refused = gp.Error(id=0, code=ErrorCode.PERMISSION_DENIED, message="authentication failed")
    assert isinstance(HostSync.on_connection_error(refused), PermissionDenied)
    report = gp.Error(id=0, code=ErrorCode.PROTOCOL, message="frame too large")
    assert HostSync.on_connection_error(report) is None


def test_agent_answers_each_nonce_once() -> None:
    agent = AgentSync()
    assert agent.on_marker(b"a" * 8)
    assert not agent.on_marker(b"a" * 8)  # the host resent it before our answer arrived
    assert agent.on_marker(b"b" * 8)
    assert agent.on_marker(b"a" * 8)


def test_greeting_round_trips_through_both_decoders() -> None:
    sync = counting_tokens()
    marker = sync.start()
    (item,) = HostStreamDecoder().feed(marker)
    assert isinstance(item, HostMarker)
    assert AgentSync().on_marker(item.nonce)
    data = b"stale bytes" + greeting(hello(b"", session=1), nonce=item.nonce, session=7)
    marker_seen, body = GuestStreamDecoder().feed(data)
    assert marker_seen is None and isinstance(body, bytes)
    msg = gp.response_codec.decode(body)
    assert isinstance(msg, gp.Hello) and msg.session == 7
    assert sync.on_hello(msg) is SessionStart.ANSWERED
