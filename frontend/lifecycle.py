"""The workspace life cycle: states, events, the operations each state allows.

Sans-io: nothing here touches the catalog or the helper.  The orchestrator
reads a workspace's :class:`State` from the catalog, checks an operation with
:func:`require`, moves the state with :func:`transition` (writing it back with
the catalog's compare-and-set, so two frontends cannot both win), and after
looking at the helper corrects it with :func:`reconcile`.

The transitions (the table is :data:`TRANSITIONS`)::

    creating   --created--> running         --create_failed--> destroying
    stopped    --start_requested--> starting --started--> running
                                   starting --start_failed--> stopped
                                   starting --crashed--> crashed
    running    --stop_requested--> stopping --stopped--> stopped
                                   stopping --stop_failed--> crashed
    running    --crashed--> crashed         running --vanished--> stopped
    crashed    --start_requested--> starting, --stop_requested--> stopping
    running | stopped | crashed --destroy_requested--> destroying
    destroying --destroyed--> (the row is deleted)
    destroying --destroy_failed--> crashed

Meaning of the settled states (the ones no operation is in the middle of):

* ``running``: the helper has a VM for the workspace and it is (or is coming) up.
* ``stopped``: the helper has no VM for it; the volume keeps its disk.
* ``crashed``: the VM is not known to be serving: QEMU died (the helper keeps
  the crashed VM, with its reason, until it is stopped), or a stop or a destroy
  failed half-way.  ``workspace_start``, ``workspace_stop`` and
  ``workspace_destroy`` all recover from it; ``state_reason`` says what happened.

The busy states (``creating``, ``starting``, ``stopping``, ``destroying``)
belong to the operation that set them, which may be running in another
frontend process right now: only that operation moves the workspace out of
them, and :func:`reconcile` leaves them alone.  An operation whose process died
leaves its busy state behind; the orchestrator recognises it (the process
that set it is gone: its session has ended or its pid is dead, or the row has
not been updated for longer than any operation may take) and applies
:func:`recover`: an interrupted create or destroy becomes ``destroying`` and is
finished as a destroy (``VmStop`` if the helper holds a VM, ``VolumeDelete`` if
it holds the volume, then the row is deleted); an interrupted start or stop
settles to what the helper shows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .workspace_errors import InvalidTransition, WrongState


class State(enum.StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DESTROYING = "destroying"


class Event(enum.StrEnum):
    #: The create finished: volume, VM with network, agent hello, guest configured.
    CREATED = "created"
    #: A create step failed; its made steps are being undone.
    CREATE_FAILED = "create_failed"
    START_REQUESTED = "start_requested"
    STARTED = "started"
    #: The start failed and what it made was undone (no VM left in the helper).
    START_FAILED = "start_failed"
    STOP_REQUESTED = "stop_requested"
    #: The VM is gone from the helper.
    STOPPED = "stopped"
    #: The stop did not finish (e.g. the helper became unreachable): the VM's
    #: fate is unknown, so the workspace needs a stop, start or destroy.
    STOP_FAILED = "stop_failed"
    #: The VM was seen dead (the helper reports it crashed).
    CRASHED = "crashed"
    #: The helper has no VM for a workspace that was running (stopped outside
    #: this frontend, or lost by the helper).
    VANISHED = "vanished"
    DESTROY_REQUESTED = "destroy_requested"
    #: Everything the workspace had is gone; the caller deletes its row.
    DESTROYED = "destroyed"
    #: The destroy did not finish: some of its resources may remain.
    DESTROY_FAILED = "destroy_failed"


BUSY_STATES: frozenset[State] = frozenset(
    {State.CREATING, State.STARTING, State.STOPPING, State.DESTROYING}
)
SETTLED_STATES: frozenset[State] = frozenset(State) - BUSY_STATES

#: The whole state machine.  ``destroyed`` maps to ``destroying`` because the
#: row keeps that state until the caller deletes it (see :func:`removes_row`).
TRANSITIONS: Mapping[State, Mapping[Event, State]] = {
    State.CREATING: {
        Event.CREATED: State.RUNNING,
        # A failed create is undone like a destroy, so a crash during the undo
        # leaves a row that recovery finishes (see the module docstring).
        Event.CREATE_FAILED: State.DESTROYING,
    },
    State.STARTING: {
        Event.STARTED: State.RUNNING,
        Event.START_FAILED: State.STOPPED,
        Event.CRASHED: State.CRASHED,
    },
    State.RUNNING: {
        Event.STOP_REQUESTED: State.STOPPING,
        Event.CRASHED: State.CRASHED,
        Event.VANISHED: State.STOPPED,
        Event.DESTROY_REQUESTED: State.DESTROYING,
    },
    State.STOPPING: {
        Event.STOPPED: State.STOPPED,
        Event.STOP_FAILED: State.CRASHED,
    },
    State.STOPPED: {
        Event.START_REQUESTED: State.STARTING,
        Event.DESTROY_REQUESTED: State.DESTROYING,
    },
    State.CRASHED: {
        # Starting or stopping a crashed workspace first clears the crashed
        # VM from the helper (VmStop), then goes on.
        Event.START_REQUESTED: State.STARTING,
        Event.STOP_REQUESTED: State.STOPPING,
        Event.DESTROY_REQUESTED: State.DESTROYING,
    },
    State.DESTROYING: {
        Event.DESTROYED: State.DESTROYING,
        Event.DESTROY_FAILED: State.CRASHED,
    },
}


def transition(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; :class:`InvalidTransition` if not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(str(state), str(event)) from None


def removes_row(event: Event) -> bool:
    """Whether the workspace's catalog row is deleted after ``event``."""
    return event is Event.DESTROYED


# --- operations ------------------------------------------------------------------------


class Operation(enum.StrEnum):
    EXEC = "exec"
    FILES = "files"
    NETWORK = "network"
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    FORK = "fork"
    SET_ENV = "set_env"
    LOGS = "logs"


_ANY_STATE = frozenset(State)

#: The states each operation is allowed in.
ALLOWED: Mapping[Operation, frozenset[State]] = {
    Operation.EXEC: frozenset({State.RUNNING}),
    Operation.FILES: frozenset({State.RUNNING}),
    # A stopped workspace's policy is kept and applied when it starts.
    Operation.NETWORK: frozenset({State.RUNNING, State.STOPPED}),
    Operation.START: frozenset({State.STOPPED, State.CRASHED}),
    Operation.STOP: frozenset({State.RUNNING, State.CRASHED}),
    Operation.DESTROY: frozenset({State.RUNNING, State.STOPPED, State.CRASHED}),
    # A running workspace is snapshotted live (the guest freezes); a crashed
    # one's VM still holds the volume, so it must be stopped or restarted first.
    Operation.SNAPSHOT: frozenset({State.RUNNING, State.STOPPED}),
    # The orchestrator stops a running or crashed workspace before it restores.
    Operation.RESTORE: frozenset({State.RUNNING, State.STOPPED, State.CRASHED}),
    Operation.FORK: frozenset({State.RUNNING, State.STOPPED}),
    # Env defaults are catalog-only: anything but a workspace going away.
    Operation.SET_ENV: _ANY_STATE - {State.DESTROYING},
    Operation.LOGS: _ANY_STATE,
}

_VERB: Mapping[Operation, str] = {
    Operation.EXEC: "run a command in it",
    Operation.FILES: "access its files",
    Operation.NETWORK: "change its network",
    Operation.START: "start it",
    Operation.STOP: "stop it",
    Operation.DESTROY: "destroy it",
    Operation.SNAPSHOT: "snapshot it",
    Operation.RESTORE: "restore a snapshot",
    Operation.FORK: "fork it",
    Operation.SET_ENV: "change its env defaults",
    Operation.LOGS: "read its logs",
}


def allowed(state: State, operation: Operation) -> bool:
    return state in ALLOWED[operation]


def require(workspace: str, state: State, operation: Operation | str) -> None:
    """Raise :class:`WrongState` unless ``operation`` is allowed in ``state``.

    ``workspace`` is the name the message uses ("" for none).  The message
    says the state, then what to do, e.g. "cannot run a command in it:
    workspace 'x' is stopped" and "Start it with workspace_start.".  An unknown
    operation is a ``ValueError`` (a bug, not a user error).
    """
    op = Operation(operation)
    if allowed(state, op):
        return
    who = f"workspace {workspace!r}" if workspace else "the workspace"
    cause, hint = _refusal(state, op, who)
    raise WrongState(workspace, str(state), str(op), cause, hint)


def _refusal(state: State, op: Operation, who: str) -> tuple[str, str]:
    if state in BUSY_STATES:
        if state is State.DESTROYING:
            return (
                f"{who} is busy (being destroyed)",
                "It will be gone in a moment (see workspace_list).",
            )
        return f"{who} is busy ({state})", "Retry in a moment."
    if op is Operation.START and state is State.RUNNING:
        return f"{who} is already running", "Nothing to do."
    if op is Operation.STOP and state is State.STOPPED:
        return f"{who} is already stopped", "Nothing to do."
    cause = f"cannot {_VERB[op]}: {who} is {state}"
    if state is State.CRASHED:
        cause += " (see workspace_logs for why)"
    targets = ALLOWED[op]
    # Suggest the one step that leads to a state the operation is allowed in:
    # a start leads to running, a stop to stopped.
    if State.RUNNING in targets and allowed(state, Operation.START):
        return cause, "Start it with workspace_start."
    if State.STOPPED in targets and allowed(state, Operation.STOP):
        return cause, "Stop it with workspace_stop first."
    return cause, "Check it with workspace_info."


# --- reconciliation with the helper ----------------------------------------------------

#: The helper's VM states (``VmInfo.state``); None: the helper has no such VM.
VM_STATES: tuple[str | None, ...] = ("starting", "running", "stopping", "stopped", "crashed", None)


def settled_state(vm_state: str | None) -> tuple[State, str]:
    """The settled state a workspace is in when the helper shows ``vm_state``."""
    match vm_state:
        case "running":
            return State.RUNNING, "its VM is running"
        case "starting":
            # Not dead: a VM the helper is bringing up serves in a moment.
            return State.RUNNING, "its VM is booting"
        case "stopping":
            return State.STOPPED, "its VM is being stopped"
        case "stopped":
            return State.STOPPED, "its VM is stopped"
        case "crashed":
            return State.CRASHED, "its VM crashed"
        case None:
            return State.STOPPED, "the helper has no VM for it"
        case _:
            raise ValueError(f"unknown helper VM state {vm_state!r}")


def reconcile(recorded: State, vm_state: str | None) -> tuple[State, str]:
    """What the catalog should say, given the helper's view of the workspace's VM.

    ``vm_state`` is the helper's ``VmInfo.state`` (starting, running, stopping,
    stopped, crashed), or None when the helper has no VM of that name.  Returns
    the state and a reason text (empty when nothing changes).

    * A settled state follows the helper, which is the truth about VMs: a
      workspace whose VM died shows as crashed (the helper holds the crashed
      VM) or stopped (it holds none), never running.
    * A busy state is returned unchanged: it belongs to an operation that may
      be running in another frontend.  One left behind by a dead process is
      for :func:`recover`, e.g. a workspace stuck in creating or destroying
      with no VM, which the orchestrator cleans by finishing it as a destroy.
    """
    new, why = settled_state(vm_state)  # validates vm_state in every case
    if recorded in BUSY_STATES or new is recorded:
        return recorded, ""
    if recorded is State.RUNNING and vm_state is None:
        why = "its VM is gone from the helper (stopped outside agentiso, or lost by the helper)"
    elif recorded is State.CRASHED and new is State.STOPPED:
        why = "its crashed VM was cleared from the helper"
    return new, why


def recover(recorded: State, vm_state: str | None) -> tuple[State, str]:
    """The state of a workspace whose busy operation was abandoned (its process died).

    An interrupted create or destroy becomes ``destroying``: the orchestrator
    removes what the helper still holds for it and deletes the row.  An
    interrupted start or stop settles to what the helper shows.  Settled
    states are simply reconciled.
    """
    if recorded in (State.CREATING, State.DESTROYING):
        settled_state(vm_state)  # validates vm_state
        what = "create" if recorded is State.CREATING else "destroy"
        return State.DESTROYING, f"an interrupted {what} is being cleaned up"
    if recorded in BUSY_STATES:
        new, why = settled_state(vm_state)
        what = "start" if recorded is State.STARTING else "stop"
        return new, f"an interrupted {what} was abandoned; {why}"
    return reconcile(recorded, vm_state)
