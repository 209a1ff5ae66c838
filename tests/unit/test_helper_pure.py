"""Pure parts of the helper: config parsing, authorization, systemd env."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper import systemd
from agentiso.privhelper.config import HelperConfig, load_config, parse_config, resolve_gid
from agentiso.privhelper.errors import ConfigError
from agentiso.privhelper.peercred import PeerCredentials, is_authorized


def test_missing_config_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml") == HelperConfig()


def test_config_sections_parse() -> None:
    cfg = parse_config('[server]\nsocket = "/tmp/x.sock"\ngroup = 1234\n')
    assert cfg.server.socket == "/tmp/x.sock"
    assert cfg.server.group == 1234


@pytest.mark.parametrize(
    "text",
    [
        "[server]\nsockt = '/x'\n",  # typo: unknown key
        "[nonsense]\n",  # unknown section
        "[server]\nsocket_mode = 4096\n",  # out of range
        "[server]\nmax_inflight_per_connection = 0\n",
        "[server\n",  # not TOML
    ],
)
def test_bad_config_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_resolve_gid() -> None:
    assert resolve_gid(77) == 77
    assert resolve_gid("77") == 77
    assert resolve_gid("root") == 0
    assert resolve_gid("no-such-group-agentiso-test") is None


def _peer(uid: int, gid: int, groups: tuple[int, ...] = ()) -> PeerCredentials:
    return PeerCredentials(pid=1, uid=uid, gid=gid, groups=frozenset(groups))


def test_authorization_rules() -> None:
    assert is_authorized(_peer(0, 0), None)
    assert is_authorized(_peer(0, 5), 1234)
    assert is_authorized(_peer(1000, 1234), 1234)  # primary group
    assert is_authorized(_peer(1000, 1000, (5, 1234)), 1234)  # supplementary
    assert not is_authorized(_peer(1000, 1000, (5,)), 1234)
    assert not is_authorized(_peer(1000, 1000, (1234,)), None)  # no group configured


def test_listen_fds_only_for_our_pid() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2"}
    assert systemd.listen_fds(env, pid=42) == [3, 4]
    assert systemd.listen_fds(env, pid=43) == []
    assert systemd.listen_fds({}, pid=42) == []
    assert systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, pid=42) == []


def test_notify_without_socket_is_a_no_op() -> None:
    assert systemd.notify("READY=1", env={}) is False


def test_every_helper_error_answers_with_its_own_code() -> None:
    """One root carries the wire code; the server reads it, never guesses."""
    from agentiso.privhelper.errors import GuestStepFailed, HelperError, RequestFailed
    from agentiso.privhelper.net.errors import PoolExhausted
    from agentiso.privhelper.server import INTERNAL_MESSAGE, _typed_error
    from agentiso.privhelper.storage.errors import VolumeBusy
    from agentiso.privhelper.vm.errors import VmNotFound
    from agentiso.protocol import helper as hp
    from agentiso.protocol.errors import ErrorCode

    req = hp.Ping(id=7)
    cases: list[tuple[HelperError, ErrorCode]] = [
        (RequestFailed(ErrorCode.CONFLICT, "busy"), ErrorCode.CONFLICT),
        (VmNotFound("no VM"), ErrorCode.NOT_FOUND),
        (VolumeBusy("v", "grow"), ErrorCode.CONFLICT),
        (PoolExhausted("full"), ErrorCode.LIMIT_EXCEEDED),
        (GuestStepFailed("ConfigureNetwork", "not_found", "no interface"), ErrorCode.GUEST_FAILED),
    ]
    for exc, code in cases:
        answer = _typed_error(req, exc)
        assert (answer.id, answer.code, answer.message) == (7, code, exc.message)
    # The guest's own code travels in the message, never as the helper's code.
    guest = _typed_error(req, GuestStepFailed("SetHostname", "not_found", "nope"))
    assert guest.code is ErrorCode.GUEST_FAILED and "[not_found] nope" in guest.message
    # An internal error is the helper's: its details stay in the log.
    internal = _typed_error(req, ConfigError("secret path /etc/x"))
    assert internal.code is ErrorCode.INTERNAL and internal.message == INTERNAL_MESSAGE
