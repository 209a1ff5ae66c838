"""The pure parts of privhelper/polkit.py, and its refusals without polkit."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from agentiso.privhelper.actions import Action
from agentiso.privhelper.config import parse_config
from agentiso.privhelper.errors import ConfigError, RequestFailed
from agentiso.privhelper.peercred import PeerCredentials
from agentiso.privhelper.polkit import (
    ConnectionAuthorizer,
    Decision,
    Subject,
    ask_polkit,
    decision_from_exit,
    parse_start_time,
    pkcheck_argv,
    process_subject,
)
from agentiso.protocol.errors import ErrorCode

USER = PeerCredentials(pid=os.getpid(), uid=1000, gid=1000, groups=frozenset({1000}))


def test_start_time_is_counted_after_a_hostile_command_name() -> None:
    fields = " ".join(str(n) for n in range(3, 30))
    # A process may call itself ") 1 2 3 (" to shift naive field splitting.
    assert parse_start_time(f"42 (x) 1 2 3 () {fields}") == 22


def test_start_time_of_this_process_is_read_from_proc() -> None:
    s = process_subject(USER)
    assert s is not None and s.pid == os.getpid() and s.start_time > 0 and s.uid == 1000


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1])
def test_a_peer_process_that_cannot_be_seen_has_no_subject(pid: int) -> None:
    peer = PeerCredentials(pid=pid, uid=1000, gid=1000, groups=frozenset())
    assert process_subject(peer) is None


def test_pkcheck_is_asked_about_pid_start_time_and_uid_never_interactively() -> None:
    argv = pkcheck_argv(Action.VM, Subject(pid=7, start_time=99, uid=1000))
    assert argv == ["pkcheck", "--action-id", "org.agentiso.helper.vm", "--process", "7,99,1000"]
    assert "--allow-user-interaction" not in argv and "-u" not in argv


@pytest.mark.parametrize(
    ("rc", "decision"),
    [(0, Decision.ALLOWED), (1, Decision.DENIED), (2, Decision.DENIED), (3, Decision.DENIED),
     (4, Decision.UNREACHABLE), (126, Decision.UNREACHABLE), (127, Decision.UNREACHABLE),
     (-9, Decision.UNREACHABLE)],
)
def test_only_exit_zero_allows(rc: int, decision: Decision) -> None:
    assert decision_from_exit(rc) is decision


def test_missing_pkcheck_is_unreachable_not_allowed() -> None:
    subject = Subject(pid=os.getpid(), start_time=1, uid=0)
    got = anyio.run(lambda: ask_polkit(Action.SESSION, subject, pkcheck="/nonexistent/pkcheck"))
    assert got is Decision.UNREACHABLE


def test_polkit_unreachable_refuses_with_the_fix_and_is_not_cached(tmp_path: Path) -> None:
    authz = ConnectionAuthorizer(USER, "polkit", None, pkcheck="/nonexistent/pkcheck")

    async def twice() -> list[RequestFailed]:
        errors = []
        for _ in range(2):
            with pytest.raises(RequestFailed) as exc:
                await authz.admit()
            errors.append(exc.value)
        return errors

    errors = anyio.run(twice)
    assert all(e.code == ErrorCode.UNAVAILABLE for e in errors)
    assert 'authorization = "group"' in errors[0].message
    assert authz.asked == 2  # an unreachable polkit is asked again next time


def test_polkit_mode_refuses_a_peer_it_cannot_identify() -> None:
    gone = PeerCredentials(pid=0, uid=1000, gid=1000, groups=frozenset())
    authz = ConnectionAuthorizer(gone, "polkit", 1000)
    with pytest.raises(RequestFailed) as exc:
        anyio.run(authz.admit)
    assert exc.value.code == ErrorCode.PERMISSION_DENIED and authz.asked == 0


def test_group_mode_admits_members_and_root_only() -> None:
    anyio.run(ConnectionAuthorizer(USER, "group", 1000).admit)
    root = PeerCredentials(pid=1, uid=0, gid=0, groups=frozenset())
    anyio.run(ConnectionAuthorizer(root, "group", None).admit)
    with pytest.raises(RequestFailed) as exc:
        anyio.run(ConnectionAuthorizer(USER, "group", 2000).admit)
    assert exc.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(RequestFailed):
        anyio.run(ConnectionAuthorizer(USER, "group", None).admit)


def test_authorization_key_is_group_by_default_and_checked() -> None:
    assert parse_config("").server.authorization == "group"
    assert parse_config('[server]\nauthorization = "polkit"').server.authorization == "polkit"
    with pytest.raises(ConfigError):
        parse_config('[server]\nauthorization = "allow-all"')
