"""Per-VM CPU, memory and task limits through cgroups, where the host has them.

Each QEMU goes into ``<the helper's own cgroup>/agentiso-<engine tag>/<vm>``
in the cgroup v1 ``cpu``, ``memory`` and ``pids`` hierarchies, right after it
is spawned (before it has allocated guest memory), with:

* ``cpu.cfs_quota_us``: its vCPU count of CPU time per period (a guest cannot
  take more of the host's CPUs than it was given vCPUs);
* ``memory.limit_in_bytes``: guest RAM + TCG translation cache + a fixed
  overhead for QEMU itself (:func:`limits_for`);
* ``pids.max``: a bound on its threads (a compromised QEMU cannot fork-bomb:
  its seccomp sandbox refuses fork anyway; threads are the remaining tasks).

Only cgroup v1 is implemented (what these development machines have, in the
"hybrid" layout).  On a cgroup v2 host the controllers can be delegated to
the helper only when it lives in a leaf of a delegated subtree (systemd
``Delegate=yes``); that is not done yet, so VMs run without these limits there
and the helper logs it once.  Parsing is pure; :class:`VmCgroups` is the
adapter that writes the files.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmUnavailable

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000
CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    cpu_quota_us: int
    memory_bytes: int
    pids_max: int


def limits_for(
    vcpus: int, memory_mib: int, *, tb_size_mib: int, overhead_mib: int, pids_max: int
) -> CgroupLimits:
    """The limits of one VM: its vCPUs of CPU time, its RAM plus what QEMU
    needs beside it (``tb_size_mib`` is 0 under KVM)."""
    return CgroupLimits(
        cpu_quota_us=max(1, vcpus) * CPU_PERIOD_US,
        memory_bytes=(memory_mib + tb_size_mib + overhead_mib) * MIB,
        pids_max=pids_max,
    )


def parse_v1_dirs(mounts: str, self_cgroup: str) -> dict[str, Path]:
    """Where our own cgroup is in each v1 hierarchy we need, from
    ``/proc/self/mounts`` and ``/proc/self/cgroup``; {} if any is missing."""
    mount_of: dict[str, Path] = {}
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "cgroup":
            continue
        for opt in fields[3].split(","):
            if opt in CONTROLLERS:
                mount_of[opt] = Path(fields[1])
    path_of: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        for ctrl in parts[1].split(","):
            path_of[ctrl] = parts[2]
    dirs = {}
    for ctrl in CONTROLLERS:
        if ctrl not in mount_of or ctrl not in path_of:
            return {}
        dirs[ctrl] = mount_of[ctrl] / path_of[ctrl].lstrip("/")
    return dirs


def limit_files(limits: CgroupLimits) -> dict[str, list[tuple[str, str]]]:
    """What to write, per controller, in order."""
    return {
        "cpu": [
            ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu.cfs_quota_us", str(limits.cpu_quota_us)),
        ],
        "memory": [("memory.limit_in_bytes", str(limits.memory_bytes))],
        "pids": [("pids.max", str(limits.pids_max))],
    }


class VmCgroups:
    """The cgroups of one engine's VMs (an adapter: it writes cgroupfs)."""

    def __init__(self, roots: dict[str, Path]) -> None:
        #: controller -> the directory holding this engine's VM cgroups.
        self.roots = roots

    @classmethod
    def detect(cls, tag: str, proc: Path = Path("/proc/self")) -> VmCgroups:
        """This host's v1 hierarchies (none: VMs run without limits)."""
        try:
            dirs = parse_v1_dirs((proc / "mounts").read_text(), (proc / "cgroup").read_text())
        except OSError:
            dirs = {}
        if dirs and not all(os.access(d, os.W_OK) for d in dirs.values()):
            dirs = {}
        return cls({ctrl: d / f"agentiso-{tag}" for ctrl, d in dirs.items()})

    @property
    def available(self) -> bool:
        return bool(self.roots)

    def path(self, ctrl: str, name: str) -> Path:
        return self.roots[ctrl] / name

    def place(self, name: str, pid: int, limits: CgroupLimits) -> None:
        """Make VM ``name``'s cgroups with ``limits`` and move ``pid`` (all its
        threads) into them."""
        files = limit_files(limits)
        try:
            for ctrl in CONTROLLERS:
                d = self.path(ctrl, name)
                d.mkdir(parents=True, exist_ok=True, mode=0o755)
                for fname, value in files[ctrl]:
                    (d / fname).write_text(value)
            for ctrl in CONTROLLERS:
                (self.path(ctrl, name) / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise VmUnavailable(
                f"cannot put VM {name} in its cgroup ({exc}); "
                "set [vm] cgroup_limits = false to run VMs without CPU and memory limits"
            ) from None

    def remove(self, name: str) -> bool:
        """Remove VM ``name``'s cgroups once its QEMU is gone; False if one
        still holds a process (it stays, and a later :meth:`gc` retries)."""
        done = True
        for ctrl in CONTROLLERS if self.roots else ():
            try:
                self.path(ctrl, name).rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
                continue
            # The engine's own directory goes with its last VM (nothing is
            # left behind on the host); the next VM makes it again.
            with contextlib.suppress(OSError):
                self.roots[ctrl].rmdir()
        return done

    def gc(self, keep: set[str]) -> list[str]:
        """Remove the empty cgroups of VMs not in ``keep``; their names."""
        removed: set[str] = set()
        for root in self.roots.values():
            with contextlib.suppress(FileNotFoundError):
                for d in root.iterdir():
                    if d.is_dir() and d.name not in keep and self.remove(d.name):
                        removed.add(d.name)
        return sorted(removed)

    def usage(self, name: str) -> dict[str, int]:
        """What VM ``name`` uses now: memory (current and peak bytes) and CPU
        throttling (periods and throttled periods)."""
        out: dict[str, int] = {}
        mem = self.path("memory", name)
        for key, fname in (("memory_bytes", "memory.usage_in_bytes"),
                           ("memory_peak_bytes", "memory.max_usage_in_bytes"),
                           ("memory_limit_bytes", "memory.limit_in_bytes")):
            out[key] = int((mem / fname).read_text())
        for line in (self.path("cpu", name) / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("nr_periods", "nr_throttled", "throttled_time"):
                out[f"cpu_{key}"] = int(value)
        out["pids"] = int((self.path("pids", name) / "pids.current").read_text())
        return out
