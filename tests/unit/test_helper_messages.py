"""Helper protocol messages: unions, bounds, unknown types and fields."""

from __future__ import annotations

import msgspec
import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.codec import peek_request_id
from agentiso.protocol.errors import (
    DecodeError,
    ErrorCode,
    InternalError,
    NotFound,
    PermissionDenied,
    remote_error,
)

enc = msgspec.msgpack.encode


@pytest.mark.parametrize(
    "msg",
    [hp.Hello(id=1, version=1, client="x"), hp.Ping(id=2), hp.WhoAmI(id=2**63 - 1)],
)
def test_requests_round_trip(msg: hp.HelperRequest) -> None:
    assert hp.request_codec.decode(hp.request_codec.encode(msg)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        hp.HelloOk(id=1, version=1, server="s", uptime_s=1.5),
        hp.Pong(id=3),
        hp.Identity(id=4, uid=1000, gid=1000, pid=42, admin=False),
        hp.Error(id=0, code=ErrorCode.PERMISSION_DENIED, message="no"),
    ],
)
def test_responses_round_trip(msg: hp.HelperResponse) -> None:
    assert hp.response_codec.decode(hp.response_codec.encode(msg)) == msg


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "nope", "id": 1},  # unknown message type
        {"type": "ping"},  # missing id
        {"type": "ping", "id": -1},  # negative id
        {"type": "ping", "id": 2**63},  # id out of range
        {"type": "ping", "id": "1"},  # wrong type
        {"type": "ping", "id": 1, "extra": 1},  # unknown field
        {"type": "hello", "id": 1, "version": 70000},  # version out of range
        {"type": "hello", "id": 1, "version": 1, "client": "x" * 257},  # label too long
        [1, 2, 3],  # not a map
        "ping",
    ],
)
def test_invalid_requests_are_refused_with_a_typed_error(raw: object) -> None:
    with pytest.raises(DecodeError):
        hp.request_codec.decode(enc(raw))


def test_garbage_body_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        hp.request_codec.decode(b"\xc1\xff\x00garbage")


def test_peek_request_id() -> None:
    assert peek_request_id(enc({"type": "nope", "id": 7})) == 7
    assert peek_request_id(enc({"type": "nope", "id": -7})) == 0
    assert peek_request_id(enc({"type": "nope", "id": True})) == 0
    assert peek_request_id(b"\xc1") == 0
    assert peek_request_id(enc([1])) == 0


def test_remote_error_maps_codes_to_classes() -> None:
    assert isinstance(remote_error("not_found", "x"), NotFound)
    assert isinstance(remote_error(ErrorCode.PERMISSION_DENIED, "x"), PermissionDenied)
    err = remote_error("from_the_future", "x")
    assert isinstance(err, InternalError) and "from_the_future" in err.message
