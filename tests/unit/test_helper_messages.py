"""Helper protocol messages: unions, bounds, unknown types and fields."""

from __future__ import annotations

import copy

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


HOSTILE_NAMES = [
    "a/b",
    "..",
    "../etc",
    "a\x00b",
    "x" * 300,
    "x" * 64,
    "",
    "-leading-dash",
    "UPPER",
    "a b",
    "a;rm -rf /",
    "$(reboot)",
    "`id`",
    "a|b",
    "a&b",
    "a>b",
    "a.b",
    "é",
    "name\n",
]


def _request(template: dict[str, object]) -> bytes:
    return enc({"id": 1, **template})


#: A valid message of each request with a name, and the (dotted) name fields in it.
VALID_WITH_NAMES: list[tuple[dict[str, object], list[str]]] = [
    (
        {"type": "volume_create", "name": "a", "source": {"type": "image", "image": "b"}},
        ["name", "source.image"],
    ),
    (
        {"type": "volume_create", "name": "a",
         "source": {"type": "snapshot", "volume": "b", "snapshot": "c"}},
        ["source.volume", "source.snapshot"],
    ),
    ({"type": "volume_destroy", "name": "a"}, ["name"]),
    ({"type": "volume_get", "name": "a"}, ["name"]),
    ({"type": "volume_grow", "name": "a", "size_bytes": 2**30}, ["name"]),
    ({"type": "snapshot_create", "volume": "a", "snapshot": "b"}, ["volume", "snapshot"]),
    ({"type": "snapshot_rollback", "volume": "a", "snapshot": "b"}, ["volume", "snapshot"]),
    ({"type": "snapshot_delete", "volume": "a", "snapshot": "b"}, ["volume", "snapshot"]),
    (
        {"type": "vm_start", "name": "a", "volume": "b", "resume_snapshot": "c"},
        ["name", "volume", "resume_snapshot"],
    ),
    (
        {"type": "vm_start", "name": "a", "volume": "b",
         "resume_from": {"type": "snapshot", "volume": "c", "snapshot": "d"}},
        ["resume_from.volume", "resume_from.snapshot"],
    ),
    ({"type": "vm_stop", "name": "a"}, ["name"]),
    ({"type": "vm_get", "name": "a"}, ["name"]),
    ({"type": "vm_console", "name": "a"}, ["name"]),
    ({"type": "guest_open", "vm": "a"}, ["vm"]),
]
NAME_CASES = [(msg, f) for msg, fields in VALID_WITH_NAMES for f in fields]


def _set(template: dict[str, object], dotted: str, value: object) -> dict[str, object]:
    out = copy.deepcopy(template)
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
        child = node[p]
        assert isinstance(child, dict)
        node = child
    node[leaf] = value
    return out


@pytest.mark.parametrize(("template", "field"), NAME_CASES)
def test_every_name_field_accepts_a_good_name(template: dict[str, object], field: str) -> None:
    hp.request_codec.decode(_request(_set(template, field, "good-name-1")))
    hp.request_codec.decode(_request(_set(template, field, "x" * 63)))


@pytest.mark.parametrize(("template", "field"), NAME_CASES)
@pytest.mark.parametrize("bad", HOSTILE_NAMES)
def test_every_name_field_refuses_hostile_names(
    template: dict[str, object], field: str, bad: str
) -> None:
    with pytest.raises(DecodeError):
        hp.request_codec.decode(_request(_set(template, field, bad)))


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "volume_grow", "name": "v", "size_bytes": -1},
        {"type": "volume_grow", "name": "v", "size_bytes": 0},
        {"type": "volume_grow", "name": "v", "size_bytes": 1024},  # below 64 MiB
        {"type": "volume_grow", "name": "v", "size_bytes": 2**60},  # absurd
        {"type": "volume_grow", "name": "v", "size_bytes": 1.5},
        {"type": "volume_create", "name": "v", "source": {"type": "image", "image": "m"},
         "size_bytes": 2**62},
        {"type": "vm_start", "name": "v", "volume": "v", "vcpus": 0},
        {"type": "vm_start", "name": "v", "volume": "v", "vcpus": -2},
        {"type": "vm_start", "name": "v", "volume": "v", "vcpus": 1000},
        {"type": "vm_start", "name": "v", "volume": "v", "memory_mib": 1},
        {"type": "vm_start", "name": "v", "volume": "v", "memory_mib": -256},
        {"type": "vm_start", "name": "v", "volume": "v", "memory_mib": 2**40},
        {"type": "vm_stop", "name": "v", "timeout_s": -1},
        {"type": "vm_stop", "name": "v", "timeout_s": 1e9},
        {"type": "vm_console", "name": "v", "max_bytes": -5},
        {"type": "vm_console", "name": "v", "max_bytes": 2**31},
        {"type": "volume_create", "name": "v", "source": {"type": "path", "path": "/etc/shadow"}},
        {"type": "volume_create", "name": "v", "source": {"type": "image", "image": "m",
                                                          "path": "/etc"}},
        {"type": "gc", "dry_run": "yes"},
        # resume_from names a snapshot of one of the caller's volumes, nothing else
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": "a@b"},
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": ["a", "b"]},
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": {"type": "image",
                                                                        "image": "m"}},
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": {
            "type": "snapshot", "volume": "a", "snapshot": "b", "path": "/var/lib/x.mem"}},
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": {
            "type": "snapshot", "volume": "a"}},
        {"type": "vm_start", "name": "v", "volume": "v", "resume_from": {
            "type": "snapshot", "volume": "a", "snapshot": 7}},
    ],
)
def test_absurd_sizes_counts_and_host_paths_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        hp.request_codec.decode(_request(raw))


def test_owner_is_optional_and_bounded() -> None:
    assert hp.request_codec.decode(_request({"type": "vm_get", "name": "a"})).owner is None
    msg = hp.request_codec.decode(_request({"type": "vm_get", "name": "a", "owner": 1000}))
    assert msg.owner == 1000
    for bad in (-1, 2**32, "1000", 1.5):
        with pytest.raises(DecodeError):
            hp.request_codec.decode(_request({"type": "vm_get", "name": "a", "owner": bad}))


def test_vm_start_resume_from_is_optional_and_typed() -> None:
    plain = hp.request_codec.decode(_request({"type": "vm_start", "name": "a", "volume": "b"}))
    assert isinstance(plain, hp.VmStart) and plain.resume_from is None
    msg = hp.request_codec.decode(_request({
        "type": "vm_start", "name": "a", "volume": "b",
        "resume_from": {"type": "snapshot", "volume": "src", "snapshot": "s1"}}))
    assert isinstance(msg, hp.VmStart)
    assert msg.resume_from == hp.FromSnapshot(volume="src", snapshot="s1")
    assert hp.request_codec.decode(hp.request_codec.encode(msg)) == msg
