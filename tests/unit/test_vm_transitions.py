"""The VM state machine and the supervisor's one way to change state (pure:
no QEMU; a supervisor of a record that nothing runs)."""

from __future__ import annotations

import pytest

from agentiso.privhelper.vm.engine import FINISHED, TRANSITIONS, EngineSettings, VmState
from agentiso.privhelper.vm.engine.snapshots import next_fdset, with_new_top
from agentiso.privhelper.vm.engine.supervisor import VmSupervisor, exit_reason
from agentiso.privhelper.vm.errors import VmStateConflict
from agentiso.privhelper.vm.spec import DiskLayer
from tests.unit.test_vm_state import make_record


def supervisor() -> VmSupervisor:
    return VmSupervisor(
        make_record(), EngineSettings(state_dir="/nonexistent"), adopted=False,
        popen=None, pidfd=-1, publish=lambda event: None,
    )


def test_final_states_have_no_way_out_and_every_live_state_can_end() -> None:
    for state in FINISHED:
        assert TRANSITIONS[state] == frozenset()
    for state in VmState:
        if state not in FINISHED:
            assert set(FINISHED) <= TRANSITIONS[state], state
    assert VmState.RUNNING not in TRANSITIONS[VmState.STOPPING]  # no way back from a stop


def test_transition_follows_the_table() -> None:
    vm = supervisor()
    assert vm.state is VmState.STARTING
    assert vm.transition(VmState.RUNNING)
    assert vm.transition(VmState.PAUSED)
    assert vm.transition(VmState.RUNNING)
    assert vm.transition(VmState.STOPPING)
    with pytest.raises(VmStateConflict):
        vm.transition(VmState.RUNNING)
    assert vm.transition(VmState.STOPPED)
    with pytest.raises(VmStateConflict):
        vm.transition(VmState.CRASHED)
    assert vm.state is VmState.STOPPED


def test_an_event_that_no_longer_applies_changes_nothing() -> None:
    """QEMU's STOP while we stop the VM must not make a stopping VM 'paused'."""
    vm = supervisor()
    vm.transition(VmState.RUNNING)
    vm.transition(VmState.STOPPING)
    assert not vm.transition(VmState.PAUSED, only_from=(VmState.RUNNING,))
    assert vm.state is VmState.STOPPING


def test_qmp_events_move_the_state_only_where_they_apply() -> None:
    vm = supervisor()
    vm._on_event("RESUME", None)  # the `cont` of a start: STARTING stays until start says so
    assert vm.state is VmState.STARTING
    vm.transition(VmState.RUNNING)
    vm._on_event("STOP", None)
    assert vm.state is VmState.PAUSED
    vm._on_event("RESUME", None)
    assert vm.state is VmState.RUNNING
    vm._on_event("MIGRATION", {"status": "completed"})
    assert vm._migration == "completed"


def test_guards_refuse_with_a_typed_error() -> None:
    vm = supervisor()
    with pytest.raises(VmStateConflict, match="cannot pause"):
        vm.require(VmState.RUNNING, VmState.PAUSED, to="pause")
    vm.mark_dead("gone")
    assert vm.state is VmState.CRASHED and vm.exit_reason == "gone"
    with pytest.raises(VmStateConflict):
        vm.require_alive(to="run query-status")


def test_exit_reason_names_what_ended_qemu() -> None:
    assert exit_reason(None, None) == "QEMU exited"
    assert exit_reason(0, "QMP quit") == "QEMU exited with status 0 after QMP quit"
    assert exit_reason(-9, None) == "QEMU killed by signal 9 (SIGKILL)"


def test_exit_reason_of_a_real_time_signal_does_not_raise() -> None:
    # signal.Signals has no members for SIGRTMIN+k: Signals(n) raised ValueError
    # in the watcher, so a QEMU killed by one took the watcher down.
    import signal

    rt = signal.SIGRTMIN + 3
    assert exit_reason(-rt, None) == f"QEMU killed by signal {rt} (SIGRTMIN+3)"
    top = signal.SIGRTMAX - 1
    assert exit_reason(-top, "QMP quit").endswith(
        f"(SIGRTMIN+{top - signal.SIGRTMIN}) after QMP quit"
    )
    assert exit_reason(-200, None) == "QEMU killed by signal 200 (signal 200)"


def test_next_fdset_checks_qemus_reply() -> None:
    assert next_fdset([{"fdset-id": 3}, {"fdset-id": 7}], 2) == 8
    assert next_fdset([], 2) == 3
    # A reply of the wrong shape is ignored, never trusted into an index.
    assert next_fdset("nonsense", 1) == 2
    assert next_fdset([{"fdset-id": "9"}, 5], 1) == 2


def test_a_switch_puts_the_new_top_over_a_read_only_chain() -> None:
    rec = make_record()
    new = with_new_top(rec, DiskLayer(format="qcow2", path="/v/top2.qcow2"), "disk0-s1", 1)
    assert new.top_node == "disk0-s1" and new.overlay_generation == 1
    assert new.spec.disks[0].path == "/v/top2.qcow2" and not new.spec.disks[0].read_only
    assert all(layer.read_only for layer in new.spec.disks[1:])


def test_a_disk_error_that_pauses_the_vm_is_kept_until_it_resumes() -> None:
    vm = supervisor()
    vm.transition(VmState.RUNNING)
    # QEMU reports the error, then pauses (werror=enospc).
    vm._on_event("BLOCK_IO_ERROR", {
        "device": "", "node-name": "disk0", "operation": "write", "action": "stop",
        "nospace": True, "reason": "No space left on device",
    })
    vm._on_event("STOP", None)
    st = vm.status()
    assert st.state == VmState.PAUSED
    assert st.io_error is not None and "no space left on the host's storage" in st.io_error
    vm._on_event("RESUME", None)
    assert vm.status().io_error is None and vm.state == VmState.RUNNING


def test_only_a_disk_error_that_pauses_the_vm_is_reported() -> None:
    from agentiso.privhelper.vm.engine.types import io_error_reason

    base = {"operation": "read", "reason": "Input/output error"}
    assert io_error_reason({**base, "action": "report"}) is None
    assert io_error_reason({**base, "action": "ignore"}) is None
    assert io_error_reason("not a dict") is None
    other = io_error_reason({**base, "action": "stop"})
    assert other == "a host I/O error on read of its disk (Input/output error)"
    # A guest-chosen reason cannot make the text unbounded.
    long = io_error_reason({**base, "action": "stop", "reason": "x" * 10_000})
    assert long is not None and len(long) < 300
