"""Shared test configuration.

* Async tests use anyio's own pytest plugin on the asyncio backend:
  mark them ``@pytest.mark.anyio``.
* Integration tests (``tests/integration``) use real system components and
  need root; they are skipped with an explicit reason where that is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="integration tests need root"))


# --- the session's leak check ----------------------------------------------------
#
# Several test runs may share a host (engineers side by side; CI runs alone).
# Each thing of ours the check sees is classed by who could have made it:
# * this run's: a network namespace named with this process's pid (the
#   harness's ``<prefix>-<pid>-<n>-<hex>``, the helper fixture's
#   ``agentiso-t<pid>-...``) or with the pid of a live process of this run (the
#   demo's ``agentiso-demo-<pid>``); a QEMU descended from this process, or
#   living in such a namespace, or watched (pidfd) by a process of this run;
# * another run's: the same, for a live process that is not of this run (its
#   helper, its adopting engine, its pytest) and not an orphan of it (see
#   ``_Procs.other_run``: a helper this run leaked still watches its QEMUs);
# * nobody's: a root-namespace nft table, link or system state directory, a
#   namespace named without a live pid, an orphaned QEMU no live process of
#   another run watches.  It counts as this run's if it was not there when the run began
#   (as every leftover did before runs could overlap): alone, as in CI, every
#   leftover is caught; overlapping, only another run's real leak can be
#   blamed on this one.
# A leak is what is this run's or nobody's at the end and was not there at
# the start.


class _Procs:
    """One look at /proc: parents, which processes are this run's, pidfd watchers."""

    def __init__(self) -> None:
        from agentiso.privhelper.vm.procfs import read_stat

        self.me = os.getpid()
        self.ppid: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (st := read_stat(int(entry.name))) is not None:
                self.ppid[st.pid] = st.ppid
        self._watchers: dict[int, set[int]] | None = None
        self.my_ancestors: set[int] = set()
        pid = self.ppid.get(self.me, 0)
        while pid > 0 and pid not in self.my_ancestors:
            self.my_ancestors.add(pid)
            pid = self.ppid.get(pid, 0)

    def alive(self, pid: int) -> bool:
        return pid in self.ppid

    def other_run(self, pid: int) -> bool:
        """``pid`` is alive, not of this run, and no orphan of it: a process whose
        parent is one of this process's own ancestors was (unless it is a test
        run itself) reparented there when its parent died, and may be a helper
        this run leaked, with the QEMUs it still watches."""
        if not self.alive(pid) or self.ours(pid):
            return False
        if self.ppid[pid] in self.my_ancestors:
            try:
                return b"pytest" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
        return True

    def ours(self, pid: int) -> bool:
        """``pid`` is this process or descends from it."""
        seen: set[int] = set()
        while pid > 1 and pid not in seen:
            if pid == self.me:
                return True
            seen.add(pid)
            pid = self.ppid.get(pid, 0)
        return False

    def watchers(self, pid: int) -> set[int]:
        """Processes holding a pidfd of ``pid`` (the engine watches each QEMU by one)."""
        if self._watchers is None:
            self._watchers = {}
            for holder in self.ppid:
                fds = f"/proc/{holder}/fd"
                try:
                    names = os.listdir(fds)
                except OSError:
                    continue
                for fd in names:
                    try:
                        if os.readlink(f"{fds}/{fd}") != "anon_inode:[pidfd]":
                            continue
                        with open(f"/proc/{holder}/fdinfo/{fd}") as f:
                            info = f.read()
                    except OSError:
                        continue
                    for line in info.splitlines():
                        if line.startswith("Pid:"):
                            self._watchers.setdefault(int(line.split()[1]), set()).add(holder)
        return self._watchers.get(pid, set())


_NETNS_PID = re.compile(r"(?:^|-)t?(\d+)(?:-|$)")


def _netns_owner(name: str, procs: _Procs) -> str | None:
    """"ours", "theirs" or None (nobody's) for a namespace, by the pid in its name."""
    m = _NETNS_PID.search(name)
    if m is None:
        return None
    pid = int(m.group(1))
    if procs.ours(pid):
        return "ours"
    return "theirs" if procs.other_run(pid) else None


Footprint = dict[str, set[str]]


def _host_footprint() -> tuple[Footprint, Footprint, Footprint]:
    """(this run's, nobody's, another run's): nft tables, links, namespaces,
    QEMU processes, system state directories."""

    def lines(*argv: str) -> list[str]:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.strip() for line in out.splitlines() if line.strip()]

    procs = _Procs()
    ours: Footprint = {k: set() for k in (
        "nft tables", "links", "network namespaces", "QEMU pids", "state dirs")}
    nobody: Footprint = {k: set() for k in ours}
    theirs: Footprint = {k: set() for k in ours}

    def put(kind: str, item: str, owner: str | None) -> None:
        {"ours": ours, "theirs": theirs}.get(owner or "", nobody)[kind].add(item)

    nobody["nft tables"] = {t for t in lines("nft", "list", "tables") if "agentiso" in t}
    namespaces: dict[int, str | None] = {}  # inode -> owner
    for line in lines("ip", "netns", "list"):
        name = line.split()[0]
        ns_owner = _netns_owner(name, procs)
        if "agentiso" in name or ns_owner == "ours":
            put("network namespaces", name, ns_owner)
        with contextlib.suppress(OSError):
            namespaces[os.stat(f"/run/netns/{name}").st_ino] = ns_owner
    for line in lines("ip", "-o", "link"):
        if "agentiso" in line:
            # A veth's line names the namespace of its peer: that says whose it is.
            peer = line.split(" link-netns ")[1].split()[0] if " link-netns " in line else ""
            put("links", line.split(":")[1].strip(), _netns_owner(peer, procs) if peer else None)
    for pid in procs.ppid:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if not os.path.basename(argv.split(b"\0")[0]).startswith(b"qemu-system"):
            continue
        if procs.ours(pid):
            owner: str | None = "ours"
        elif b"agentiso-" not in argv:
            continue  # not ours, and no QEMU of this project
        else:
            try:
                netns_owner = namespaces.get(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                netns_owner = None
            watched = {"ours" if procs.ours(w) else "theirs" if procs.other_run(w) else None
                       for w in procs.watchers(pid)}
            owner = ("ours" if "ours" in (netns_owner, *watched)
                     else "theirs" if "theirs" in (netns_owner, *watched) else None)
        put("QEMU pids", str(pid), owner)
    nobody["state dirs"] = {d for d in ("/var/lib/agentiso", "/run/agentiso") if Path(d).exists()}
    return ours, nobody, theirs


def _union(a: Footprint, b: Footprint) -> Footprint:
    return {k: a[k] | b[k] for k in a}


def _new(after: Footprint, *before: Footprint) -> Footprint:
    """What ``after`` holds that none of ``before`` did, by kind (non-empty only)."""
    found = {k: after[k].difference(*(b[k] for b in before)) for k in after}
    return {k: v for k, v in found.items() if v}


def suite_footprint() -> tuple[Footprint, Footprint]:
    """(this process's or nobody's, another run's): for scripts/run_tests.py,
    the ancestor of every part, whose own check at the end of the suite
    catches what no part could call its own (an orphaned QEMU, a root
    namespace nft table) once nothing of the suite runs any more."""
    ours, nobody, theirs = _host_footprint()
    return _union(ours, nobody), theirs


def suite_leaks(before: tuple[Footprint, Footprint]) -> dict[str, list[str]]:
    """What the suite left on the host since ``before`` (a :func:`suite_footprint`)."""
    after, _ = suite_footprint()
    return {k: sorted(v) for k, v in _new(after, *before).items()}


#: Set by scripts/run_tests.py for each part (one pytest process among
#: several at once): a part fails on what is provably its own; what is
#: nobody's when it ends may be another part's still running, and is left to
#: the runner's check at the end of the suite.
_PART = "AGENTISO_TEST_PART"


# Every process this run starts inherits this variable (unless something on the
# way clears the environment, as systemd-socket-activate does for the helper,
# whose QEMUs the checks above find): any still alive at the end is a leak,
# however it was detached (daemons, double forks, servers started by a test).
_RUN_MARKER = "AGENTISO_TEST_RUN"


def _marked_processes(marker: bytes) -> set[str]:
    """``pid (command)`` of each live process, other than this one, whose
    environment carries ``marker``."""
    from agentiso.privhelper.vm.procfs import read_stat

    found: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0"):
                continue
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        st = read_stat(int(entry.name))
        if st is not None and st.state not in ("Z", "X"):
            found.add(f"{entry.name} ({b' '.join(argv).decode(errors='replace')[:120]})")
    return found


def _leftover_processes(marker: bytes, grace: float = 10.0) -> set[str]:
    """Marked processes still alive after ``grace`` seconds (one just told to
    stop may take a moment to go)."""
    import time

    deadline = time.monotonic() + grace
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="session", autouse=True)
def host_left_clean() -> object:
    """Fail the run if it left anything of ours on the host (see above), or
    any process it started still running."""
    if os.geteuid() != 0:
        yield None
        return
    marker_value = str(os.getpid())
    os.environ[_RUN_MARKER] = marker_value
    marker = f"{_RUN_MARKER}={marker_value}".encode()
    before_ours, before_nobody, before_theirs = _host_footprint()
    yield None
    after_ours, after_nobody, _ = _host_footprint()
    after = after_ours if os.environ.get(_PART) else _union(after_ours, after_nobody)
    leaked: dict[str, object] = {
        k: sorted(v) for k, v in _new(after, before_ours, before_nobody, before_theirs).items()
    }
    if processes := _leftover_processes(marker):
        leaked["processes"] = sorted(processes)
    assert not leaked, f"the test run left these behind on the host: {leaked}"
