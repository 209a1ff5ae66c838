"""polkit decides for a helper configured with ``authorization = "polkit"``.

A real ``dbus-daemon`` (a system bus of our own: own config file, own socket)
and a real ``polkitd`` run for this module, without systemd.  polkitd runs in a
private mount namespace where the repo's policy and rules file are the only
ones, and where /etc/passwd and /etc/group know the test users (the host's
files are not touched).  A private helper (its own network namespace) asks it
through ``pkcheck``; unprivileged clients connect as the test uids.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import anyio
import pytest

from agentiso.privhelper.actions import Action
from agentiso.privhelper.polkit import Decision, Subject, ask_polkit
from tests.support import helper_process
from tests.support.helper_process import (
    HelperProcess,
    public_runtime,
    public_tmpdir,
    running_helper,
)

REPO = Path(__file__).resolve().parents[2]
POLKITD = Path("/usr/lib/polkit-1/polkitd")
MEMBER = 64331  # in the "agentiso" group, as polkitd's /etc/group says
OUTSIDER = 64332  # a user in no group of the rules

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Runs as root in a new mount namespace (unshare): our files over the system's, then polkitd.
POLKITD_SCRIPT = """set -e
mount --bind "$1/actions" /usr/share/polkit-1/actions
mount --bind "$1/rules" /usr/share/polkit-1/rules.d
mount -t tmpfs tmpfs /etc/polkit-1/rules.d
mount --bind "$1/passwd" /etc/passwd
mount --bind "$1/group" /etc/group
exec "$2" --no-debug
"""


@dataclass
class PolkitBus:
    workdir: Path
    bus: subprocess.Popen[bytes]
    polkitd: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.workdir / 'bus.sock'}"

    def start_polkitd(self) -> None:
        self.polkitd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", POLKITD_SCRIPT,
             "polkitd", str(self.workdir), str(POLKITD)],
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address},
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "polkitd.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        me = Subject(pid=os.getpid(), start_time=_start_time(os.getpid()), uid=0)
        while anyio.run(self.ask, Action.SESSION, me) is not Decision.ALLOWED:
            if self.polkitd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("polkitd did not start: "
                                   + (self.workdir / "polkitd.log").read_text())
            time.sleep(0.1)

    def stop_polkitd(self) -> None:
        if self.polkitd is not None and self.polkitd.poll() is None:
            self.polkitd.send_signal(signal.SIGTERM)
            self.polkitd.wait(10)
        self.polkitd = None

    async def ask(self, action: Action, subject: Subject) -> Decision:
        with mock.patch.dict(os.environ, {"DBUS_SYSTEM_BUS_ADDRESS": self.address}):
            return await ask_polkit(action, subject)


def _start_time(pid: int) -> int:
    from agentiso.privhelper.polkit import parse_start_time

    return parse_start_time(Path(f"/proc/{pid}/stat").read_text())


@pytest.fixture(scope="module")
def polkit_bus() -> Iterator[PolkitBus]:
    for tool in ("dbus-daemon", "pkcheck", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages dbus, polkitd, util-linux)")
    if not POLKITD.exists():
        pytest.skip(f"{POLKITD} is missing (Debian package polkitd)")
    work = public_tmpdir("agentiso-polkit-")
    (work / "actions").mkdir()
    (work / "rules").mkdir()
    shutil.copy(REPO / "polkit" / "org.agentiso.helper.policy", work / "actions")
    shutil.copy(REPO / "polkit" / "org.agentiso.helper.rules", work / "rules")
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    (work / "passwd").write_text(
        passwd + f"pkmember:x:{MEMBER}:{MEMBER}::/nonexistent:/usr/sbin/nologin\n"
        f"pkoutsider:x:{OUTSIDER}:{OUTSIDER}::/nonexistent:/usr/sbin/nologin\n")
    # Membership by the group file alone (not the process's groups): what polkit reads.
    (work / "group").write_text(
        "".join(line + "\n" for line in group.splitlines() if not line.startswith("agentiso:"))
        + "agentiso:x:64330:pkmember\n")
    (work / "bus.conf").write_text(BUS_CONFIG.format(socket=work / "bus.sock"))
    bus = subprocess.Popen(
        ["dbus-daemon", f"--config-file={work / 'bus.conf'}", "--nofork"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = PolkitBus(work, bus)
    try:
        for _ in range(100):
            if (work / "bus.sock").exists():
                break
            time.sleep(0.05)
        env.start_polkitd()
        yield env
    finally:
        env.stop_polkitd()
        bus.terminate()
        bus.wait(10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def helper(polkit_bus: PolkitBus) -> Iterator[HelperProcess]:
    # The helper finds the bus as every D-Bus client does, by DBUS_SYSTEM_BUS_ADDRESS;
    # systemd-socket-activate passes on only a few variables, so env(1) sets it.
    argv = ["env", f"DBUS_SYSTEM_BUS_ADDRESS={polkit_bus.address}", *helper_process.HELPER]
    with mock.patch.object(helper_process, "HELPER", argv), \
            running_helper(group="agentiso", config='[server]\nauthorization = "polkit"\n') as h:
        yield h


# A client as an unprivileged uid: one request per line of stdin, one answer per line.
CLIENT = textwrap.dedent(
    """
    import sys
    from agentiso.protocol import helper as hp
    from agentiso.protocol.blocking import BlockingHelperClient
    from agentiso.protocol.errors import RemoteError
    try:
        c = BlockingHelperClient(sys.argv[1])
    except RemoteError as e:
        print("REFUSED", e.code, e.message, flush=True)
        sys.exit(0)
    print("CONNECTED", flush=True)
    for line in sys.stdin:
        req = getattr(hp, line.strip())(id=0)
        try:
            print("OK", type(c.request(req)).__name__, flush=True)
        except RemoteError as e:
            print("ERR", e.code, e.message, flush=True)
    """
)


class Client:
    """A connection held open by a process of ``uid``, asked one request at a time."""

    def __init__(self, helper: HelperProcess, uid: int) -> None:
        python = getattr(sys, "_base_executable", sys.executable)
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
             python, "-c", CLIENT, str(helper.socket)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/", env={"PATH": os.environ["PATH"], "PYTHONPATH": str(public_runtime())},
        )
        self.greeting = self._line()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line, self.proc.stderr.read() if self.proc.stderr else ""
        return line

    def ask(self, request: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def test_group_member_is_allowed_the_user_classes_and_refused_admin(
    helper: HelperProcess,
) -> None:
    c = Client(helper, MEMBER)  # connecting is the session class
    try:
        assert c.greeting == "CONNECTED"
        assert c.ask("WhoAmI") == "OK Identity"
        assert c.ask("VolumeList") == "OK Volumes"  # volume class
        assert c.ask("VmList").startswith("OK ")  # vm class
        assert c.ask("AdminList").startswith("ERR permission_denied")
    finally:
        c.close()


USER_CLASSES = [a for a in Action if a is not Action.ADMIN]


def _decisions(polkit_bus: PolkitBus, uid: int) -> dict[Action, Decision]:
    """What polkit answers for a process of ``uid`` (with no groups of its own), per class."""
    with subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                           "--clear-groups", "sleep", "30"]) as proc:
        try:
            time.sleep(0.1)
            subject = Subject(proc.pid, _start_time(proc.pid), uid)
            return {a: anyio.run(polkit_bus.ask, a, subject) for a in Action}
        finally:
            proc.kill()


def test_polkit_itself_grants_members_the_user_classes_and_root_alone_admin(
    polkit_bus: PolkitBus,
) -> None:
    """The rules file, not only the helper's own root check, decides."""
    member = _decisions(polkit_bus, MEMBER)
    assert all(member[a] is Decision.ALLOWED for a in USER_CLASSES), member
    assert member[Action.ADMIN] is Decision.DENIED
    outsider = _decisions(polkit_bus, OUTSIDER)
    assert all(d is Decision.DENIED for d in outsider.values()), outsider
    me = Subject(os.getpid(), _start_time(os.getpid()), 0)
    assert anyio.run(polkit_bus.ask, Action.ADMIN, me) is Decision.ALLOWED


def test_a_recycled_pid_gets_no_decision(polkit_bus: PolkitBus) -> None:
    """The subject carries the start time: another process under the same pid is not it."""
    me = Subject(os.getpid(), _start_time(os.getpid()) + 1, 0)
    assert anyio.run(polkit_bus.ask, Action.SESSION, me) is not Decision.ALLOWED


def test_uid_outside_the_rules_is_refused(helper: HelperProcess) -> None:
    c = Client(helper, OUTSIDER)
    c.close()
    assert c.greeting.startswith("REFUSED permission_denied polkit does not allow")
    assert "org.agentiso.helper.session" in c.greeting


def test_polkit_down_is_refused_and_decisions_are_cached_per_connection(
    helper: HelperProcess, polkit_bus: PolkitBus,
) -> None:
    c = Client(helper, MEMBER)
    try:
        assert c.ask("VolumeList") == "OK Volumes"
        polkit_bus.stop_polkitd()
        # Cached for this connection and class: polkit is not asked again.
        assert c.ask("VolumeList") == "OK Volumes"
        # A class this connection never used must be asked: refused, never allowed.
        assert c.ask("VmList").startswith("ERR unavailable")
        # A new connection must be asked for its session: refused, with the fix.
        fresh = Client(helper, MEMBER)
        fresh.close()
        assert fresh.greeting.startswith("REFUSED unavailable"), fresh.greeting
        assert "cannot reach it" in fresh.greeting
    finally:
        c.close()
        polkit_bus.start_polkitd()
    log = helper.log()
    assert "polkit_decision" in log and "unreachable" in log and "peer_refused" in log


def test_the_policy_alone_grants_nothing(polkit_bus: PolkitBus) -> None:
    """Without the rules file (removed, or never installed) a member is refused
    every class: the policy's defaults are all "no", never "active session"."""
    rules = polkit_bus.workdir / "rules" / "org.agentiso.helper.rules"
    aside = polkit_bus.workdir / "rules.aside"
    polkit_bus.stop_polkitd()
    rules.rename(aside)
    try:
        polkit_bus.start_polkitd()
        decisions = _decisions(polkit_bus, MEMBER)
        assert all(d is Decision.DENIED for d in decisions.values()), decisions
    finally:
        polkit_bus.stop_polkitd()
        aside.rename(rules)
        polkit_bus.start_polkitd()
