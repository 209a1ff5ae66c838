"""The workspace state machine: every transition, every refusal, every reconcile pair."""

from __future__ import annotations

import itertools

import pytest

from agentiso.frontend.errors import FrontendError
from agentiso.frontend.lifecycle import (
    ALLOWED,
    BUSY_STATES,
    SETTLED_STATES,
    TRANSITIONS,
    VM_STATES,
    Event,
    Operation,
    State,
    allowed,
    reconcile,
    recover,
    removes_row,
    require,
    settled_state,
    transition,
)
from agentiso.frontend.workspace_errors import InvalidTransition, WrongState

S, E, Op = State, Event, Operation

# The expected machine, written out independently of the module's table.
EXPECTED: dict[tuple[State, Event], State] = {
    (S.CREATING, E.CREATED): S.RUNNING,
    (S.CREATING, E.CREATE_FAILED): S.DESTROYING,
    (S.STARTING, E.STARTED): S.RUNNING,
    (S.STARTING, E.START_FAILED): S.STOPPED,
    (S.STARTING, E.CRASHED): S.CRASHED,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPING,
    (S.RUNNING, E.CRASHED): S.CRASHED,
    (S.RUNNING, E.VANISHED): S.STOPPED,
    (S.RUNNING, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.STOPPING, E.STOP_FAILED): S.CRASHED,
    (S.STOPPED, E.START_REQUESTED): S.STARTING,
    (S.STOPPED, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.CRASHED, E.START_REQUESTED): S.STARTING,
    (S.CRASHED, E.STOP_REQUESTED): S.STOPPING,
    (S.CRASHED, E.DESTROY_REQUESTED): S.DESTROYING,
    (S.DESTROYING, E.DESTROYED): S.DESTROYING,
    (S.DESTROYING, E.DESTROY_FAILED): S.CRASHED,
}

ALL_PAIRS = list(itertools.product(State, Event))


def test_states_and_events_are_the_documented_strings() -> None:
    assert [str(s) for s in State] == [
        "creating", "starting", "running", "stopping", "stopped", "crashed", "destroying",
    ]  # fmt: skip
    assert State("running") is State.RUNNING
    assert Event("destroy_requested") is Event.DESTROY_REQUESTED
    assert frozenset(State) == BUSY_STATES | SETTLED_STATES
    assert {S.RUNNING, S.STOPPED, S.CRASHED} == SETTLED_STATES


def test_table_is_exactly_the_expected_machine() -> None:
    table = {(s, e): t for s, row in TRANSITIONS.items() for e, t in row.items()}
    assert table == EXPECTED


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_every_transition(state: State, event: Event) -> None:
    if (state, event) in EXPECTED:
        assert transition(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as info:
            transition(state, event)
        assert isinstance(info.value, FrontendError)
        assert (info.value.state, info.value.event) == (state, event)
        assert str(state) in str(info.value) and str(event) in str(info.value)


def test_every_state_is_reachable_from_creating_and_every_workspace_can_be_destroyed() -> None:
    reachable = {S.CREATING}
    frontier = [S.CREATING]
    while frontier:
        s = frontier.pop()
        for t in TRANSITIONS.get(s, {}).values():
            if t not in reachable:
                reachable.add(t)
                frontier.append(t)
    assert reachable == set(State)
    # From every state some path of events ends in `destroyed`.
    for start in State:
        seen, frontier = {start}, [start]
        while frontier:
            s = frontier.pop()
            for t in TRANSITIONS.get(s, {}).values():
                if t not in seen:
                    seen.add(t)
                    frontier.append(t)
        assert S.DESTROYING in seen, start


def test_only_destroyed_removes_the_row() -> None:
    assert [e for e in Event if removes_row(e)] == [E.DESTROYED]


def test_busy_states_take_no_request() -> None:
    requests = {E.START_REQUESTED, E.STOP_REQUESTED, E.DESTROY_REQUESTED}
    for s in BUSY_STATES:
        assert not requests & set(TRANSITIONS[s]), s


# --- require ---------------------------------------------------------------------------

EXPECTED_ALLOWED: dict[Operation, set[State]] = {
    Op.EXEC: {S.RUNNING},
    Op.FILES: {S.RUNNING},
    Op.NETWORK: {S.RUNNING, S.STOPPED},
    Op.START: {S.STOPPED, S.CRASHED},
    Op.STOP: {S.RUNNING, S.CRASHED},
    Op.DESTROY: {S.RUNNING, S.STOPPED, S.CRASHED},
    Op.SNAPSHOT: {S.RUNNING, S.STOPPED},
    Op.RESTORE: {S.RUNNING, S.STOPPED, S.CRASHED},
    Op.FORK: {S.RUNNING, S.STOPPED},
    Op.SET_ENV: set(State) - {S.DESTROYING},
    Op.LOGS: set(State),
}

OPS = list(itertools.product(State, Operation))


def test_allowed_table_is_the_expected_one() -> None:
    assert {op: set(states) for op, states in ALLOWED.items()} == EXPECTED_ALLOWED


@pytest.mark.parametrize(("state", "op"), OPS, ids=[f"{s}-{o}" for s, o in OPS])
def test_require(state: State, op: Operation) -> None:
    if state in EXPECTED_ALLOWED[op]:
        assert allowed(state, op)
        require("x", state, op)
        return
    assert not allowed(state, op)
    with pytest.raises(WrongState) as info:
        require("x", state, op)
    err = info.value
    msg = str(err)
    assert isinstance(err, FrontendError)
    assert (err.workspace, err.state, err.operation) == ("x", state, op)
    assert "workspace 'x'" in msg
    assert msg == f"{err.cause}\n{err.hint}" and "\n" not in err.cause + err.hint
    assert err.hint[0].isupper() and err.hint.endswith(".")
    if state in BUSY_STATES:
        assert "busy" in msg
        if state is not S.DESTROYING:
            assert "Retry in a moment." in msg
    else:
        assert str(state) in msg


@pytest.mark.parametrize(
    ("state", "op", "message"),
    [
        (S.STOPPED, Op.EXEC, "cannot run a command in it: workspace 'x' is stopped\n"
                            "Start it with workspace_start."),
        (S.STOPPED, Op.FILES, "cannot access its files: workspace 'x' is stopped\n"
                             "Start it with workspace_start."),
        (S.CRASHED, Op.EXEC, "cannot run a command in it: workspace 'x' is crashed "
                            "(see workspace_logs for why)\nStart it with workspace_start."),
        (S.CRASHED, Op.SNAPSHOT, "cannot snapshot it: workspace 'x' is crashed "
                                "(see workspace_logs for why)\nStart it with workspace_start."),
        (S.RUNNING, Op.START, "workspace 'x' is already running\nNothing to do."),
        (S.STOPPED, Op.STOP, "workspace 'x' is already stopped\nNothing to do."),
        (S.STARTING, Op.EXEC, "workspace 'x' is busy (starting)\nRetry in a moment."),
        (S.CREATING, Op.DESTROY, "workspace 'x' is busy (creating)\nRetry in a moment."),
        (S.DESTROYING, Op.EXEC, "workspace 'x' is busy (being destroyed)\n"
                               "It will be gone in a moment (see workspace_list)."),
    ],
)  # fmt: skip
def test_require_messages_say_what_to_do(state: State, op: Operation, message: str) -> None:
    with pytest.raises(WrongState) as info:
        require("x", state, op)
    assert str(info.value) == message


def test_require_without_a_name_and_with_plain_strings() -> None:
    with pytest.raises(WrongState, match="the workspace is stopped"):
        require("", S.STOPPED, Op.EXEC)
    require("x", S.RUNNING, "exec")
    with pytest.raises(WrongState, match="workspace 'x' is busy"):
        require("x", S.STARTING, "files")
    with pytest.raises(ValueError):
        require("x", S.RUNNING, "dance")


# --- reconcile -------------------------------------------------------------------------

V = VM_STATES
# recorded state -> helper VM state -> expected catalog state
EXPECTED_RECONCILE: dict[State, dict[str | None, State]] = {
    S.RUNNING: {
        "starting": S.RUNNING, "running": S.RUNNING, "stopping": S.STOPPED,
        "stopped": S.STOPPED, "crashed": S.CRASHED, None: S.STOPPED,
    },
    S.STOPPED: {
        "starting": S.RUNNING, "running": S.RUNNING, "stopping": S.STOPPED,
        "stopped": S.STOPPED, "crashed": S.CRASHED, None: S.STOPPED,
    },
    S.CRASHED: {
        "starting": S.RUNNING, "running": S.RUNNING, "stopping": S.STOPPED,
        "stopped": S.STOPPED, "crashed": S.CRASHED, None: S.STOPPED,
    },
    # Busy states belong to their operation: never changed by reconcile.
    **{b: {v: b for v in V} for b in BUSY_STATES},
}  # fmt: skip

PAIRS = list(itertools.product(State, V))


@pytest.mark.parametrize(("recorded", "vm"), PAIRS, ids=[f"{r}-{v}" for r, v in PAIRS])
def test_reconcile(recorded: State, vm: str | None) -> None:
    new, reason = reconcile(recorded, vm)
    assert new is EXPECTED_RECONCILE[recorded][vm]
    # The rule of the issue: a dead VM never shows as running.
    if vm in ("crashed", "stopped", None):
        assert new is not S.RUNNING
    if new is recorded:
        assert reason == ""
    else:
        assert reason and "\n" not in reason
    # Reconciling again is a no-op (the result is a fixed point).
    assert reconcile(new, vm) == (new, "")


def test_reconcile_reasons() -> None:
    assert reconcile(S.RUNNING, None)[1].startswith("its VM is gone from the helper")
    assert reconcile(S.RUNNING, "crashed") == (S.CRASHED, "its VM crashed")
    assert reconcile(S.CRASHED, None) == (S.STOPPED, "its crashed VM was cleared from the helper")
    assert reconcile(S.CREATING, None) == (S.CREATING, "")
    assert reconcile(S.DESTROYING, None) == (S.DESTROYING, "")


@pytest.mark.parametrize("bad", ["paused", "", "RUNNING"])
def test_reconcile_refuses_unknown_vm_states(bad: str) -> None:
    for s in State:
        with pytest.raises(ValueError, match="unknown helper VM state"):
            reconcile(s, bad)
        with pytest.raises(ValueError, match="unknown helper VM state"):
            recover(s, bad)


@pytest.mark.parametrize(("recorded", "vm"), PAIRS, ids=[f"{r}-{v}" for r, v in PAIRS])
def test_recover(recorded: State, vm: str | None) -> None:
    new, reason = recover(recorded, vm)
    if recorded in (S.CREATING, S.DESTROYING):
        assert new is S.DESTROYING
        assert "interrupted" in reason
    elif recorded in BUSY_STATES:
        assert (new, reason.rsplit("; ", 1)[1]) == settled_state(vm)
        assert "abandoned" in reason
    else:
        assert (new, reason) == reconcile(recorded, vm)
    # A recovered state is never left busy, except destroying, which the
    # orchestrator finishes.
    assert new in SETTLED_STATES | {S.DESTROYING}
