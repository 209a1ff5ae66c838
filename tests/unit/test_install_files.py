"""systemd units and the polkit policy: valid, and consistent with the code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agentiso.privhelper.actions import ACTION_FOR_REQUEST, Action
from agentiso.protocol import helper as hp

REPO = Path(__file__).resolve().parents[2]


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    for unit in ("agentiso-helper.socket", "agentiso-helper.service"):
        text = (REPO / "systemd" / unit).read_text()
        # verify checks that ExecStart exists: point it at this checkout's command.
        ours = str(Path(sys.executable).parent / "agentiso-helper")
        text = text.replace("/usr/local/bin/agentiso-helper", ours)
        (tmp_path / unit).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         str(tmp_path / "agentiso-helper.socket"), str(tmp_path / "agentiso-helper.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Unknown" not in r.stderr and "ignoring" not in r.stderr, r.stderr


def _unit(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_units_keep_vms_alive_and_activate_by_socket() -> None:
    svc = _unit("agentiso-helper.service")
    sock = _unit("agentiso-helper.socket")
    assert svc["KillMode"] == "process"
    assert svc["Type"] == "notify"
    assert "MemoryDenyWriteExecute" not in svc  # would break QEMU's TCG
    assert sock["ListenStream"] == "/run/agentiso/helper.sock"
    assert sock["SocketMode"] == "0660" and sock["SocketGroup"] == "agentiso"


def test_polkit_policy_matches_the_action_table() -> None:
    root = ET.parse(REPO / "polkit" / "org.agentiso.helper.policy").getroot()
    ids = [a.get("id") for a in root.iter("action")]
    assert len(ids) == len(set(ids))
    assert set(ids) == {a.value for a in Action}


def test_every_request_type_has_an_action_class() -> None:
    assert set(typing.get_args(hp.HelperRequest)) == set(ACTION_FOR_REQUEST)
