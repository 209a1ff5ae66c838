"""The time limits on the helper wire: VmStart.time_limits and what VmInfo shows.

One test per field trying to break it; a client can only ask for bounded
limits and one of two actions."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import DecodeError


def _start(limits: object) -> bytes:
    return msgspec.msgpack.encode(
        {"type": "vm_start", "id": 1, "name": "a", "volume": "b", "time_limits": limits}
    )


def _decode(limits: object) -> hp.VmStart:
    msg = hp.request_codec.decode(_start(limits))
    assert isinstance(msg, hp.VmStart)
    return msg


def test_time_limits_are_optional() -> None:
    plain = hp.request_codec.decode(
        msgspec.msgpack.encode({"type": "vm_start", "id": 1, "name": "a", "volume": "b"})
    )
    assert isinstance(plain, hp.VmStart) and plain.time_limits is None
    assert _decode(None).time_limits is None


def test_good_limits_round_trip() -> None:
    msg = _decode({"idle_s": 600, "lifetime_s": 86400.5, "action": "destroy"})
    assert msg.time_limits == hp.TimeLimits(idle_s=600, lifetime_s=86400.5, action="destroy")
    assert hp.request_codec.decode(hp.request_codec.encode(msg)) == msg
    only_idle = _decode({"idle_s": 10})
    assert only_idle.time_limits == hp.TimeLimits(idle_s=10, lifetime_s=None, action="stop")
    assert _decode({"lifetime_s": 30 * 24 * 3600}).time_limits is not None
    assert _decode({}).time_limits == hp.TimeLimits()  # no limit at all


BAD_SECONDS: list[Any] = [-1, 0, 9.99, 30 * 24 * 3600 + 1, 1e300, float("inf"),
                          float("nan"), "600", [600], {"s": 600}, True]


@pytest.mark.parametrize("bad", BAD_SECONDS)
def test_idle_s_is_bounded(bad: object) -> None:
    with pytest.raises(DecodeError):
        _decode({"idle_s": bad})


@pytest.mark.parametrize("bad", BAD_SECONDS)
def test_lifetime_s_is_bounded(bad: object) -> None:
    with pytest.raises(DecodeError):
        _decode({"lifetime_s": bad})


@pytest.mark.parametrize("bad", ["kill", "STOP", "", "stop; rm -rf /", 1, None, ["stop"]])
def test_action_is_stop_or_destroy(bad: object) -> None:
    with pytest.raises(DecodeError):
        _decode({"idle_s": 60, "action": bad})


@pytest.mark.parametrize(
    "bad",
    ["600", 600, ["600", "stop"], {"idle_s": 60, "command": "/bin/sh"},
     {"idle_s": 60, "at": 5}],
)
def test_time_limits_is_a_closed_struct(bad: object) -> None:
    with pytest.raises(DecodeError):
        _decode(bad)


def test_vm_info_shows_limits_and_how_the_vm_ended() -> None:
    info = hp.VmInfo(
        id=3, name="a", volume="b", state="stopped", vcpus=1, memory_mib=256,
        created=1.0e9, reason="idle for 600 s (time limit)",
        time_limits=hp.TimeLimits(idle_s=600),
        ended=hp.VmEnded(limit="idle", at=1.5e9, action="stop"),
    )
    assert hp.response_codec.decode(hp.response_codec.encode(info)) == info
    running = hp.VmInfo(
        id=3, name="a", volume="b", state="running", vcpus=1, memory_mib=256,
        created=1.0e9, time_limits=hp.TimeLimits(lifetime_s=60), expires_at=1.0e9 + 60,
    )
    assert hp.response_codec.decode(hp.response_codec.encode(running)) == running


@pytest.mark.parametrize(
    "ended",
    [{"limit": "cpu", "at": 1, "action": "stop"}, {"limit": "idle", "at": -1, "action": "stop"},
     {"limit": "idle", "at": 1, "action": "delete"}, {"limit": "idle", "at": 1}],
)
def test_vm_ended_is_bounded(ended: object) -> None:
    raw = {"type": "vm", "id": 1, "name": "a", "volume": "b", "state": "stopped", "vcpus": 1,
           "memory_mib": 256, "created": 1, "ended": ended}
    with pytest.raises(DecodeError):
        hp.response_codec.decode(msgspec.msgpack.encode(raw))
