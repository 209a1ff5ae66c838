"""systemd units and the polkit policy: valid, and consistent with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
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


# --- make install: helper.toml, the plan, uninstall's decisions, the lock ---------------

sys.path.insert(0, str(REPO / "scripts"))
import helper_toml  # noqa: E402
import install  # noqa: E402

from agentiso.privhelper.config import HelperConfig, parse_config  # noqa: E402
from agentiso.privhelper.vm.engine.types import EngineSettings  # noqa: E402


def _uncommented(text: str) -> str:
    """helper.toml with every key that has a TOML value uncommented."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^# ([a-z_]+) = (.*)$", line)
        out.append(f"{m[1]} = {m[2]}" if m and "(unset" not in line else line)
    return "\n".join(out)


def test_helper_toml_means_the_defaults_commented_and_uncommented() -> None:
    text = helper_toml.render()
    assert parse_config(text) == HelperConfig()
    # Every value shown is the default and every key is one the helper accepts.
    # ([vm] is a plain table here, checked against the engine's settings below.)
    full = parse_config(_uncommented(text))
    assert msgspec.structs.replace(full, vm={}) == HelperConfig()
    keys = set(re.findall(r"^# ([a-z_]+) = ", text, re.M))
    tables = set(re.findall(r"^\[([a-z_.]+)\]$", text, re.M))
    assert tables >= {"server", "paths", "limits", "storage", "storage.zfs", "net", "vm"}

    def walk(cls: type[msgspec.Struct]) -> set[str]:
        names: set[str] = set()
        for f in msgspec.structs.fields(cls):
            t = f.type
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                names |= walk(t)
            elif cls is HelperConfig:
                continue
            else:
                names.add(f.name)
        return names

    expected = walk(HelperConfig) | {f.name for f in msgspec.structs.fields(EngineSettings)}
    # state_dir is written once, under [paths]; the engine's comes from there.
    assert keys == expected
    # The [vm] table takes the engine's settings as written.
    vm = tomllib.loads(_uncommented(text))["vm"]
    assert msgspec.convert({**vm, "state_dir": "/x"}, EngineSettings) == EngineSettings("/x")


def test_helper_toml_carries_the_code_comments() -> None:
    text = helper_toml.render()
    assert "# Who may do what:" in text  # the #: comment above ServerConfig.authorization
    assert all(line == "" or line.startswith(("#", "[")) for line in text.splitlines())


def test_install_puts_down_every_unit_and_policy_file_of_the_repo() -> None:
    items = install.plan("/opt/agentiso", b"", [])
    sources = {i.source for i in items if i.source is not None}
    shipped = {*(REPO / "systemd").iterdir(), *(REPO / "polkit").iterdir()}
    assert shipped <= sources
    paths = [i.path for i in items]
    assert len(paths) == len(set(paths))
    # Directories come before what they hold (uninstall walks the list backwards).
    for i, p in enumerate(paths):
        assert all(not q.startswith(p + "/") for q in paths[:i]), p


def test_mcp_servers_entry_runs_agentiso_serve() -> None:
    entry = json.loads(install.mcp_servers_entry())
    assert entry == {"mcpServers": {"agentiso": {"command": "/usr/local/bin/agentiso",
                                                 "args": ["serve"]}}}


def test_uninstall_keeps_what_changed_since_install(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("as installed")
    entry = {"path": "/f", "kind": "file", "sha256": install.sha256(f)}
    assert install.removal(entry, f) is None
    f.write_text("edited")
    assert install.removal(entry, f) == "changed since install: yours now"
    link = tmp_path / "l"
    link.symlink_to("/opt/agentiso/bin/agentiso")
    sym = {"path": "/l", "kind": "symlink", "target": "/opt/agentiso/bin/agentiso"}
    assert install.removal(sym, link) is None
    link.unlink()
    link.symlink_to("/usr/bin/true")
    assert install.removal(sym, link) == "no longer the link install made"
    d = tmp_path / "d"
    d.mkdir()
    assert install.removal({"path": "/d", "kind": "dir"}, d) is None
    (d / "x").touch()
    assert install.removal({"path": "/d", "kind": "dir"}, d) == "not empty"
    assert install.removal({"path": "/g", "kind": "dir"}, tmp_path / "g") == "already gone"


def _pins(lock: Path) -> dict[str, str]:
    text = lock.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pins = {}
    for block in blocks:
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m[1]} has no hash in {lock.name}"
            pins[m[1].lower().replace("_", "-").replace(".", "-")] = m[2]
    return pins


def test_lock_files_pin_every_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = _pins(REPO / "requirements.lock")
    dev = _pins(REPO / "requirements-dev.lock")

    def name(req: str) -> str:
        return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower().replace("_", "-").replace(
            ".", "-")

    for req in project["dependencies"]:
        assert name(req) in runtime and name(req) in dev, req
    for req in project["optional-dependencies"]["dev"]:
        assert name(req) in dev, req
    # One resolution: the runtime pins are the dev lock's too.
    assert all(dev[n] == v for n, v in runtime.items())
    assert not any(line.startswith(("--index-url", "--find-links", "--extra-index-url"))
                   for line in (REPO / "requirements.lock").read_text().splitlines())


def test_dependencies_whose_api_moves_have_upper_bounds() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bounded = {d.split(">=")[0]: d for d in deps}
    for pkg in ("mcp", "msgspec", "anyio", "qemu.qmp", "pyroute2"):
        assert "<" in bounded[pkg], bounded[pkg]
    assert "<3" in bounded["mcp"]


def test_install_plan_puts_images_under_the_helpers_images_dir(tmp_path: Path) -> None:
    image = tmp_path / "minimal"
    items = install.plan("/opt/agentiso", b"", [image])
    trees = [i for i in items if i.kind == "tree" and i.source == image]
    assert [t.path for t in trees] == ["/var/lib/agentiso/images/minimal"]
    paths = [i.path for i in items]
    assert paths.index("/var/lib/agentiso/images") < paths.index(trees[0].path)
    state = next(i for i in items if i.path == "/var/lib/agentiso")
    assert state.mode == 0o700  # the helper's state directory, as its unit makes it


def test_install_refuses_a_directory_that_is_no_built_image(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "install.py"), "install",
         "--destdir", str(tmp_path / "root"), "--image", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "not a built guest image" in r.stderr, r.stderr
    assert "run make image first" in r.stderr
    assert not (tmp_path / "root").exists()
