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
