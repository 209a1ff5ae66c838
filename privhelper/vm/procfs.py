"""Reading /proc: pid start times (against pid reuse), argv, uids, our QEMUs.

Parsing is pure (functions taking the file text); the readers are thin and
return ``None`` when the process is gone, which is a normal outcome here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cmdline import PROCESS_NAME_PREFIX


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    #: Clock ticks after boot at which the process started (field 22).
    start_time: int


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat.  ``comm`` may hold spaces and ')' so split at the last ')'."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError("not a /proc/<pid>/stat line")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # fields[0] is field 3 (state); start time is field 22.
    return ProcStat(pid=pid, state=fields[0], ppid=int(fields[1]), start_time=int(fields[19]))


def parse_status_ids(text: str, key: str) -> tuple[int, int, int, int]:
    """The real, effective, saved and fs ids of ``Uid:`` or ``Gid:`` in /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            a, b, c, d = (int(x) for x in line.split()[1:5])
            return a, b, c, d
    raise ValueError(f"no {key} line")


def parse_status_groups(text: str) -> list[int]:
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return [int(x) for x in line.split()[1:]]
    raise ValueError("no Groups line")


def vm_name_from_argv(argv: list[str]) -> str | None:
    """The VM name if ``argv`` is one of our QEMUs (``-name guest=agentiso-<vm>,...``)."""
    if not argv or "qemu-system" not in os.path.basename(argv[0]):
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "-name":
            for part in argv[i + 1].split(","):
                if part.startswith("guest=" + PROCESS_NAME_PREFIX):
                    return part[len("guest=" + PROCESS_NAME_PREFIX) :]
    return None


def parse_cpuinfo_tsc_khz(text: str) -> int | None:
    """The host TSC rate in kHz from /proc/cpuinfo, when the TSC is constant.

    Only trusted with ``constant_tsc`` (the TSC ticks at a fixed rate, which
    ``cpu MHz`` then reports on virtualised hosts); otherwise None.
    """
    mhz: float | None = None
    constant = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif key == "flags" and not constant:
            constant = "constant_tsc" in value.split()
        if mhz is not None and constant:
            break
    if mhz is None or not constant or mhz <= 0:
        return None
    return round(mhz * 1000)


def read_host_tsc_khz(proc: Path = Path("/proc")) -> int | None:
    data = _read(proc / "cpuinfo")
    return None if data is None else parse_cpuinfo_tsc_khz(data.decode(errors="replace"))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    data = _read(proc / str(pid) / "stat")
    if data is None:
        return None
    try:
        return parse_proc_stat(data.decode(errors="replace"))
    except (ValueError, IndexError):
        return None


def read_argv(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    data = _read(proc / str(pid) / "cmdline")
    if data is None:
        return None
    return [a.decode(errors="replace") for a in data.split(b"\0")[:-1]]


def read_status(pid: int, proc: Path = Path("/proc")) -> str | None:
    data = _read(proc / str(pid) / "status")
    return None if data is None else data.decode(errors="replace")


def is_same_process(pid: int, start_time: int, proc: Path = Path("/proc")) -> bool:
    """True while ``pid`` is alive (not a zombie) and started at ``start_time``."""
    st = read_stat(pid, proc)
    return st is not None and st.start_time == start_time and st.state not in ("Z", "X")


def scan_agentiso_qemus(proc: Path = Path("/proc")) -> dict[int, str]:
    """Every live process that looks like one of our QEMUs: ``{pid: vm name}``."""
    found: dict[int, str] = {}
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = read_argv(pid, proc)
        if not argv:
            continue
        name = vm_name_from_argv(argv)
        if name is None:
            continue
        st = read_stat(pid, proc)
        if st is not None and st.state not in ("Z", "X"):
            found[pid] = name
    return found


def uids_in_use(lo: int, hi: int, proc: Path = Path("/proc")) -> set[int]:
    """Real uids in ``[lo, hi)`` of every live process (orphans, other helpers' VMs)."""
    found: set[int] = set()
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            # The owner of /proc/<pid> is the process's effective uid (root for a
            # non-dumpable process; QEMU started as a range uid stays dumpable).
            uid = entry.stat(follow_symlinks=False).st_uid
        except OSError:
            continue
        if lo <= uid < hi:
            found.add(uid)
    return found
