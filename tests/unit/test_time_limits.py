"""Time limits, the pure part: which VM a limit ends next, when, and why."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.registry import MAX_ENDED_PER_OWNER, EndedVmRecord, Registry
from agentiso.privhelper.timelimits import (
    MAX_SLEEP_S,
    Expiry,
    Watched,
    expiry,
    next_expiry,
    reason,
    sleep_for,
)
from agentiso.protocol import helper as hp

WALL = 1_800_000_000.0  # the wall clock "now"
MONO = 5_000.0  # the monotonic clock "now"


def vm(key: str = "m1", *, idle: float | None = None, life: float | None = None,
       started_ago: float = 0.0, active_ago: float = 0.0, busy: bool = False) -> Watched:
    return Watched(
        key=key, limits=hp.TimeLimits(idle_s=idle, lifetime_s=life),
        started=WALL - started_ago, last_active=MONO - active_ago, busy=busy,
    )


def test_no_limit_never_expires() -> None:
    assert expiry(vm(), WALL, MONO) is None
    assert next_expiry([vm(), vm("m2")], WALL, MONO) is None
    assert next_expiry([], WALL, MONO) is None


def test_idle_counts_from_the_last_activity() -> None:
    assert expiry(vm(idle=600, active_ago=100), WALL, MONO) == Expiry("m1", "idle", 500)
    assert expiry(vm(idle=600, active_ago=600), WALL, MONO) == Expiry("m1", "idle", 0)
    due = expiry(vm(idle=600, active_ago=700), WALL, MONO)
    assert due is not None and due.delay == -100  # overdue: fire now


def test_idle_ignores_the_start_time() -> None:
    # Started long ago but used just now: idle from the use, not from the start.
    assert expiry(vm(idle=60, started_ago=10_000, active_ago=5), WALL, MONO) == Expiry(
        "m1", "idle", 55
    )


def test_a_request_in_flight_is_not_idle() -> None:
    # A long exec with no output: the last frame is old, but the VM is in use.
    assert expiry(vm(idle=60, active_ago=3600, busy=True), WALL, MONO) == Expiry(
        "m1", "idle", 60
    )


def test_activity_in_the_future_does_not_extend_idle() -> None:
    # A monotonic time ahead of "now" (clock read out of order) counts as now.
    assert expiry(vm(idle=60, active_ago=-1000), WALL, MONO) == Expiry("m1", "idle", 60)


def test_lifetime_counts_from_the_start_whatever_the_traffic() -> None:
    assert expiry(vm(life=3600, started_ago=600), WALL, MONO) == Expiry("m1", "lifetime", 3000)
    # busy and just active: the lifetime still fires
    e = expiry(vm(life=3600, started_ago=4000, busy=True), WALL, MONO)
    assert e == Expiry("m1", "lifetime", -400)


def test_the_earlier_of_both_limits_wins() -> None:
    assert expiry(vm(idle=60, life=3600, started_ago=10, active_ago=10), WALL, MONO) == Expiry(
        "m1", "idle", 50
    )
    assert expiry(vm(idle=600, life=100, started_ago=90), WALL, MONO) == Expiry(
        "m1", "lifetime", 10
    )


def test_on_a_tie_the_lifetime_wins() -> None:
    assert expiry(vm(idle=60, life=60, started_ago=0, active_ago=0), WALL, MONO) == Expiry(
        "m1", "lifetime", 60
    )


def test_next_expiry_picks_the_earliest_vm() -> None:
    vms = [
        vm("a", idle=600, active_ago=0),
        vm("b", life=100, started_ago=50),
        vm("c"),
        vm("d", idle=30, busy=True, active_ago=1000),
    ]
    assert next_expiry(vms, WALL, MONO) == Expiry("d", "idle", 30)
    assert next_expiry(vms[:3], WALL, MONO) == Expiry("b", "lifetime", 50)


@pytest.mark.parametrize(
    ("e", "sleep"),
    [
        (None, MAX_SLEEP_S),
        (Expiry("a", "idle", 5.5), 5.5),
        (Expiry("a", "idle", -3), 0.0),
        (Expiry("a", "lifetime", 10 * 86400), MAX_SLEEP_S),  # a wall-clock step is caught
    ],
)
def test_the_timer_sleeps_until_the_next_deadline_but_not_longer_than_the_cap(
    e: Expiry | None, sleep: float
) -> None:
    assert sleep_for(e) == sleep


def test_reasons_say_which_limit_and_what_was_done() -> None:
    assert reason("idle", hp.TimeLimits(idle_s=600), False) == "idle for 600 s (time limit)"
    assert reason("lifetime", hp.TimeLimits(lifetime_s=3600.5), False) == (
        "lifetime of 3600.5 s reached (time limit)"
    )
    destroyed = reason("lifetime", hp.TimeLimits(lifetime_s=60, action="destroy"), True)
    assert destroyed.startswith("lifetime of 60 s reached (time limit)")
    assert "destroyed" in destroyed


def test_the_registry_keeps_limits_and_ended_records_across_a_restart(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.json")
    vol = reg.add_volume(1000, "ws", "image:minimal", 1 << 30)
    rec = reg.add_vm(1000, "a", vol.key, 1, 256)
    rec.time_limits = hp.TimeLimits(idle_s=600, action="destroy")
    ended = EndedVmRecord(
        owner=1000, name="b", volume="ws2", vcpus=1, memory_mib=256, created=WALL,
        time_limits=hp.TimeLimits(lifetime_s=60), limit="lifetime", at=WALL + 60,
        action="stop", reason="lifetime of 60 s reached (time limit)",
    )
    reg.add_ended(ended)
    reg.save()
    again = Registry.load(tmp_path / "registry.json")
    assert again.vm(1000, "a").time_limits == hp.TimeLimits(idle_s=600, action="destroy")
    assert again.ended_vm(1000, "b") == ended
    assert again.ended_vm(1001, "b") is None  # per owner, like every name
    assert again.ended_vms(1000) == [ended] and again.ended_vms(1001) == []
    # An ended VM is no VM: it holds nothing and blocks no volume.
    assert [m.name for m in again.vms(1000)] == ["a"]
    again.add_ended(msgspec.structs.replace(ended, reason="newer"))
    assert [e.reason for e in again.ended_vms()] == ["newer"]  # replaced, not doubled
    assert again.forget_ended(1000, "b") and not again.forget_ended(1000, "b")


def test_a_registry_from_before_time_limits_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(
        '{"version": 1, "volumes": [], "vms": [{"key": "m000000000000", "owner": 1, '
        '"name": "a", "volume_key": "v000000000000", "vcpus": 1, "memory_mib": 256, '
        '"created": 1.0}]}'
    )
    reg = Registry.load(path)
    assert reg.vm(1, "a").time_limits is None and reg.ended_vms() == []


def test_an_owner_keeps_a_bounded_number_of_ended_records(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.json")

    def ended(owner: int, i: int) -> EndedVmRecord:
        return EndedVmRecord(
            owner=owner, name=f"vm{i}", volume="v", vcpus=1, memory_mib=256, created=WALL,
            time_limits=hp.TimeLimits(idle_s=60), limit="idle", at=WALL + i, action="stop",
            reason="idle for 60 s (time limit)",
        )

    reg.add_ended(ended(2000, 0))
    for i in range(MAX_ENDED_PER_OWNER + 10):
        reg.add_ended(ended(1000, i))
    mine = reg.ended_vms(1000)
    assert len(mine) == MAX_ENDED_PER_OWNER
    assert min(e.at for e in mine) == WALL + 10  # the oldest went first
    assert reg.ended_vm(2000, "vm0") is not None  # another owner's are untouched
