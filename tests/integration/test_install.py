"""``make install`` / ``make uninstall`` into a DESTDIR-style root.

A real install into the host's root would change this shared machine (a
system group, units, /usr/local/bin), so the install goes under a temporary
root: the real virtualenv from requirements.lock, the real wheel, the real
files.  The installed units pass ``systemd-analyze verify --root`` (which also
finds the installed ``agentiso-helper`` command through its symlink), and
uninstall leaves no file of the list behind but the one the admin edited.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentiso.privhelper.config import HelperConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = [sys.executable, str(REPO / "scripts" / "install.py")]

#: What an install puts down (besides the virtualenv's own files and its manifest).
EXPECTED = [
    "opt/agentiso/bin/agentiso",
    "opt/agentiso/bin/agentiso-helper",
    "opt/agentiso/install-manifest.json",
    "usr/local/bin/agentiso",
    "usr/local/bin/agentiso-helper",
    "etc/systemd/system/agentiso-helper.socket",
    "etc/systemd/system/agentiso-helper.service",
    "etc/sysusers.d/agentiso.conf",
    "usr/share/polkit-1/actions/org.agentiso.helper.policy",
    "etc/polkit-1/rules.d/50-agentiso.rules",
    "usr/share/doc/agentiso/README.md",
    "etc/agentiso/helper.toml",
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


def _lock_pins(lock: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M)
    return {name.lower().replace("_", "-").replace(".", "-"): v for name, v in pins}


def test_install_verify_uninstall(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run([*INSTALL, "install", "--destdir", str(root)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # stdout is the MCP client configuration, and only that.
    entry = json.loads(r.stdout)["mcpServers"]["agentiso"]
    assert entry == {"command": "/usr/local/bin/agentiso", "args": ["serve"]}

    for path in EXPECTED:
        assert (root / path).exists() or (root / path).is_symlink(), path
    assert (root / "usr/local/bin/agentiso-helper").readlink() == Path(
        "/opt/agentiso/bin/agentiso-helper")
    # Scripts name the interpreter where it will be, not where it was staged.
    assert (root / "opt/agentiso/bin/agentiso").read_text().startswith(
        "#!/opt/agentiso/bin/python\n")
    # helper.toml: every key commented, so it means the defaults.
    toml = (root / "etc/agentiso/helper.toml").read_text()
    assert parse_config(toml) == HelperConfig()
    assert "# authorization = \"group\"" in toml

    # The venv holds exactly the lock's versions, and the package runs from it.
    py = str(root / "opt/agentiso/bin/python")
    freeze = subprocess.run([py, "-m", "pip", "freeze", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True).stdout
    installed = _lock_pins_from_freeze(freeze)
    for name, version in _lock_pins(REPO / "requirements.lock").items():
        assert installed.get(name) == version, (name, version, installed.get(name))
    out = subprocess.run([py, "-m", "agentiso.privhelper.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr

    # systemd-analyze verify resolves units and commands inside the root:
    # give it the host's system units to depend on (scaffolding, removed after).
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = [str(root / "etc/systemd/system" / u)
             for u in ("agentiso-helper.socket", "agentiso-helper.service")]
    v = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr
    assert "not executable" not in v.stderr and "Unknown" not in v.stderr, v.stderr
    shutil.rmtree(root / "usr/lib")
    # The sysusers file makes the group (in the root's own /etc/group; scaffolding too).
    made = [p for p in ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/.pwd.lock")
            if not (root / p).exists()]
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, timeout=60,
                   capture_output=True)
    assert re.search(r"^agentiso:x:\d+:$", (root / "etc/group").read_text(), re.M)
    for p in made:
        (root / p).unlink(missing_ok=True)
        (root / (p + "-")).unlink(missing_ok=True)

    # A second install is refused; it does not write over the first.
    again = subprocess.run([*INSTALL, "install", "--destdir", str(root)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already installed" in again.stderr

    # The admin edits helper.toml: uninstall keeps that file, and removes all the rest.
    (root / "etc/agentiso/helper.toml").write_text('[server]\nauthorization = "polkit"\n')
    u = subprocess.run([*INSTALL, "uninstall", "--destdir", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert u.returncode == 0, u.stderr
    assert "helper.toml kept: changed since install" in u.stderr
    assert _files(root) == {"etc/agentiso/helper.toml"}
    assert {str(p.relative_to(root)) for p in root.rglob("*")} == {
        "etc", "etc/agentiso", "etc/agentiso/helper.toml"}
    # Nothing left to uninstall: a clear error.
    gone = subprocess.run([*INSTALL, "uninstall", "--destdir", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no install manifest" in gone.stderr


def _lock_pins_from_freeze(freeze: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", freeze, re.M)
    return {name.lower().replace("_", "-").replace(".", "-"): v for name, v in pins}
