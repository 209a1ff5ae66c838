"""Finding QEMUs again: adopting recorded ones after a helper restart, and
orphans (our QEMUs that no record describes).

A recorded QEMU is alive only if its pid exists, is not a zombie, has the
recorded start time and its argv names the VM; this is checked again after
``pidfd_open`` to close the pid-reuse window.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection
from pathlib import Path

from ..launch import ENGINE_TAG_VAR
from ..procfs import (
    is_same_process,
    parse_status_ids,
    read_argv,
    read_status,
    scan_agentiso_qemus,
    vm_name_from_argv,
)
from ..record import VmRecord
from .types import Orphan

DEAD_REASON = "QEMU ended while no helper was watching"


def is_our_qemu(rec: VmRecord) -> bool:
    """The record's pid is still the QEMU it recorded."""
    if not is_same_process(rec.pid, rec.pid_start_time):
        return False
    argv = read_argv(rec.pid)
    return argv is not None and vm_name_from_argv(argv) == rec.name


def open_recorded(rec: VmRecord) -> int:
    """A pidfd of the recorded QEMU, or -1 if it is gone (or its pid reused)."""
    if not is_our_qemu(rec):
        return -1
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return -1
    # The pid could have been recycled between the check and the open.
    if not is_our_qemu(rec):
        os.close(pidfd)
        return -1
    return pidfd


def started_here(pid: int, engine_tag: str) -> bool:
    """Our QEMUs carry their engine's tag in their environment."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{ENGINE_TAG_VAR}={engine_tag}".encode() in env


def find_orphans(known_pids: Collection[int], engine_tag: str) -> list[Orphan]:
    """QEMU processes this engine started (its tag) that it does not watch.
    Another helper's QEMUs (a test helper beside the production one) are
    never this engine's orphans."""
    orphans = []
    for pid, name in sorted(scan_agentiso_qemus().items()):
        if pid in known_pids or not started_here(pid, engine_tag):
            continue
        text = read_status(pid)
        uid = parse_status_ids(text, "Uid")[0] if text else -1
        orphans.append(Orphan(pid=pid, name=name, uid=uid))
    return orphans


def kill_orphan(orphan: Orphan, known_pids: Collection[int]) -> bool:
    """SIGKILL an orphan if the pid still is that QEMU; True if signalled."""
    try:
        pidfd = os.pidfd_open(orphan.pid)
    except ProcessLookupError:
        return False
    try:
        argv = read_argv(orphan.pid)
        if argv is None or vm_name_from_argv(argv) != orphan.name:
            return False
        if orphan.pid in known_pids:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
