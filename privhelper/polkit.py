"""Authorization of helper peers: group membership (default) or polkit.

With ``authorization = "group"`` (the default, for hosts without polkit) a peer
is allowed if it is root or a member of the helper's group, decided once per
connection from the kernel's SO_PEERCRED facts.

With ``authorization = "polkit"`` the helper asks polkit, through ``pkcheck``,
whether the peer *process* may perform the request's action class
(:mod:`.actions`): once at connect time for ``session``, then for the class of
every request.  The subject is the peer's pid, its start time and its uid, so a
recycled pid cannot inherit a decision.  Decisions (allowed or refused) are
cached per connection and action; a failure to reach polkit is never cached
and never allows: the request is refused as ``unavailable``.

polkit adds a check, it never relaxes one: the admin class stays root-only in
the server whatever polkit answers.
"""

from __future__ import annotations

import enum
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from agentiso.protocol.errors import ErrorCode

from .actions import Action
from .errors import RequestFailed
from .peercred import PeerCredentials, is_authorized

log = structlog.get_logger("agentiso.helper.polkit")

PKCHECK = "pkcheck"
#: How long one pkcheck may take.  On a host where polkitd is down, D-Bus
#: activation may try to start it; the peer waits at most this long.
PKCHECK_TIMEOUT_S = 10.0


class Decision(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    #: polkit could not be asked (not running, no bus, no pkcheck, timeout).
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Subject:
    """A polkit ``unix-process`` subject."""

    pid: int
    #: The process's start time in clock ticks since boot (/proc/PID/stat field 22).
    start_time: int
    uid: int


def parse_start_time(stat: str) -> int:
    """The start time field of a /proc/PID/stat line (pure).

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted from the last ``)``.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field 22 is rest[19].
    return int(rest[19])


def process_subject(peer: PeerCredentials, proc: Path = Path("/proc")) -> Subject | None:
    """The peer's subject, or None when its process is not visible (gone, or
    in another pid namespace: SO_PEERCRED then reports pid 0)."""
    if peer.pid <= 0:
        return None
    try:
        stat = (proc / str(peer.pid) / "stat").read_text()
    except OSError:
        return None
    return Subject(pid=peer.pid, start_time=parse_start_time(stat), uid=peer.uid)


def pkcheck_argv(action: Action, subject: Subject, pkcheck: str = PKCHECK) -> list[str]:
    """The pkcheck command asking polkit about ``subject`` (pure).  Never
    interactive: the helper has no agent to ask a password with."""
    return [
        pkcheck,
        "--action-id",
        action.value,
        "--process",
        f"{subject.pid},{subject.start_time},{subject.uid}",
    ]


def decision_from_exit(returncode: int) -> Decision:
    """pkcheck(1)'s exit status as a decision (pure): 0 authorized; 1 not
    authorized; 2 would need authentication and 3 was dismissed, both refusals
    here; anything else (126/127: no bus, no polkitd) is an error."""
    if returncode == 0:
        return Decision.ALLOWED
    if returncode in (1, 2, 3):
        return Decision.DENIED
    return Decision.UNREACHABLE


async def ask_polkit(
    action: Action, subject: Subject, *, pkcheck: str = PKCHECK, timeout: float = PKCHECK_TIMEOUT_S
) -> Decision:
    """Ask polkit once.  The system bus is found as every D-Bus client finds
    it (``DBUS_SYSTEM_BUS_ADDRESS``, else the standard socket)."""
    try:
        with anyio.fail_after(timeout):
            result = await anyio.run_process(
                pkcheck_argv(action, subject, pkcheck), check=False, stdin=subprocess.DEVNULL
            )
    except (OSError, TimeoutError):
        return Decision.UNREACHABLE
    return decision_from_exit(result.returncode)


def refusal(action: Action, decision: Decision, uid: int) -> RequestFailed:
    """The typed error for a decision other than allowed (pure)."""
    if decision is Decision.UNREACHABLE:
        return RequestFailed(
            ErrorCode.UNAVAILABLE,
            f"the helper is configured to ask polkit ({action.value}) and cannot reach it; "
            'start polkitd (and the system D-Bus), or set authorization = "group"',
        )
    return RequestFailed(
        ErrorCode.PERMISSION_DENIED,
        f"polkit does not allow uid {uid} {action.value}; "
        "an administrator grants it in /etc/polkit-1/rules.d (the agentiso group by default)",
    )


@dataclass
class ConnectionAuthorizer:
    """The authorization of one connection's peer, with its cache.

    ``mode`` is the helper config's ``authorization``.  In ``group`` mode every
    class is allowed to a peer admitted at connect time; in ``polkit`` mode each
    class is asked once and remembered (the lock makes concurrent requests of a
    class share one question).
    """

    peer: PeerCredentials
    mode: str
    allowed_gid: int | None
    pkcheck: str = PKCHECK
    proc: Path = Path("/proc")
    _subject: Subject | None = None
    _cache: dict[Action, Decision] = field(default_factory=dict)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: How many times polkit was asked (for tests of the cache).
    asked: int = 0

    async def admit(self) -> None:
        """Check the peer may connect at all; raises :class:`RequestFailed`."""
        if self.mode != "polkit":
            if not is_authorized(self.peer, self.allowed_gid):
                raise RequestFailed(
                    ErrorCode.PERMISSION_DENIED,
                    f"uid {self.peer.uid} is neither root nor a member of the helper's group; "
                    "an administrator adds the user to it (then log in again)",
                )
            return
        self._subject = process_subject(self.peer, self.proc)
        await self.authorize(Action.SESSION)

    async def authorize(self, action: Action) -> None:
        """Raise :class:`RequestFailed` unless the peer may perform ``action``."""
        if self.mode != "polkit":
            return
        if self._subject is None:
            raise RequestFailed(
                ErrorCode.PERMISSION_DENIED,
                "polkit cannot identify the peer process (gone, or in another pid namespace); "
                "connect from the helper's pid namespace",
            )
        async with self._lock:
            decision = self._cache.get(action)
            if decision is None:
                self.asked += 1
                decision = await ask_polkit(action, self._subject, pkcheck=self.pkcheck)
                # An audit trail of what polkit decided, once per connection and class.
                log.info(
                    "polkit_decision",
                    action=action.value,
                    decision=decision.value,
                    peer_uid=self.peer.uid,
                    peer_pid=self.peer.pid,
                )
                if decision is not Decision.UNREACHABLE:
                    self._cache[action] = decision
        if decision is not Decision.ALLOWED:
            raise refusal(action, decision, self.peer.uid)
