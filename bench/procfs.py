"""Host memory and CPU of processes, from /proc (for the benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among their users), KiB; -1 if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return -1


def rss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far; -1 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
