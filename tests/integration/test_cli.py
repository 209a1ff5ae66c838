"""The command lines, run for real: ``agentiso-helper check`` as root on this
host, and ``agentiso doctor / status / list`` as unprivileged uids (setpriv)
against a private helper, with one workspace made through the real MCP client.

The helper's socket is given the mode and group an install gives it
(0660 root:GROUP), so the permission checks meet real file permissions.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from tests.harness.images import skip_unless_image
from tests.support.helper_process import REPO, public_tmpdir
from tests.support.mcp_client import Tools, mcp_tools, public_frontend_runtime
from tests.support.mcp_env import McpEnv, mcp_env

GROUP = 64391
USER = 64392
OUTSIDER = 64393  # not in GROUP
pytestmark = skip_unless_image("minimal")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def env() -> Iterator[McpEnv]:
    with mcp_env(group=GROUP, user=USER, helper_config="") as e:
        # As installed: only root and the group may connect.
        os.chown(e.helper.socket, 0, GROUP)
        os.chmod(e.helper.socket, 0o660)
        yield e


def user_cli(uid: int, groups: list[int], config: Path, *args: str, home: Path = Path("/")
             ) -> subprocess.CompletedProcess[str]:
    """``agentiso --config CONFIG ARGS`` as ``uid`` with exactly ``groups``."""
    grp_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    python = getattr(sys, "_base_executable", sys.executable)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "PYTHONPATH": str(public_frontend_runtime()), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", *grp_arg, "--inh-caps=-all",
         python, "-s", "-m", "agentiso.frontend.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd="/", env=env,
    )


def lines_of(out: str) -> dict[str, str]:
    """Report lines by check name -> status (PASS/WARN/FAIL/SKIP)."""
    got = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and parts[0] in ("PASS", "WARN", "FAIL", "SKIP"):
            got[parts[1]] = parts[0]
    return got


def user_config(env: McpEnv, name: str, uid: int, socket_path: Path) -> Path:
    """A config for ``uid`` with its own state dir (readable by it)."""
    d = env.work / name
    d.mkdir(exist_ok=True)
    os.chown(d, uid, uid)
    cfg = d / "config.toml"
    cfg.write_text(f'helper_socket = "{socket_path}"\nstate_dir = "{d / "state"}"\n')
    return cfg


def images_dir(env: McpEnv) -> str:
    argv = env.helper.argv
    return argv[argv.index("--images-dir") + 1]


def helper_check(config: str) -> subprocess.CompletedProcess[str]:
    cfg = public_tmpdir("agentiso-check-") / "helper.toml"
    cfg.write_text(config)
    try:
        return subprocess.run(
            [sys.executable, "-m", "agentiso.privhelper.cli", "check", "--config", str(cfg)],
            capture_output=True, text=True, timeout=180, cwd=REPO,
        )
    finally:
        cfg.unlink()
        cfg.parent.rmdir()


def kvm_usable_by_others() -> bool:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0))


def test_helper_check_on_this_host(env: McpEnv) -> None:
    """An installed-like setup: every prerequisite passes but the two this
    kind of host lacks, which are warnings with their fallbacks."""
    r = helper_check(
        f'[server]\nsocket = "{env.helper.socket}"\ngroup = {GROUP}\n'
        f'[paths]\nstate_dir = "{env.helper.state_dir}"\nimages_dir = "{images_dir(env)}"\n'
        f'[vm]\nrun_dir = "{env.helper.workdir / "run"}"\n'
    )
    got = lines_of(r.stdout)
    expected_warn = set()
    if not os.path.exists("/dev/vhost-vsock"):
        expected_warn.add("vhost-vsock")
    if not kvm_usable_by_others():
        expected_warn.add("kvm")
    assert {n for n, s in got.items() if s != "PASS"} == expected_warn, r.stdout + r.stderr
    assert {"qemu", "unprivileged-qemu", "storage-qcow2", "nft", "tap", "bridge", "images",
            "uid-range", "run-dir", "group", "socket", "helper", "polkit"} <= set(got)
    if "kvm" in expected_warn:
        assert "fallback: VMs run under TCG" in r.stdout
    if "vhost-vsock" in expected_warn:
        assert "fallback: no /dev/vhost-vsock, the guest channel is virtio-serial" in r.stdout
    assert r.stdout.count("fix:") == len(expected_warn)
    assert r.returncode == 0, "warnings alone must not fail the check"


def test_helper_check_reports_fails_with_fixes_and_exit_code() -> None:
    missing = public_tmpdir("agentiso-nosock-")
    try:
        r = helper_check(
            f'[server]\nsocket = "{missing / "helper.sock"}"\ngroup = "agentiso-no-such-group"\n'
            f'[paths]\nimages_dir = "{missing / "images"}"\n'
            '[vm]\nqemu_binary = "qemu-system-nonexistent"\n'
        )
    finally:
        missing.rmdir()
    got = lines_of(r.stdout)
    assert got["group"] == got["images"] == got["qemu"] == "FAIL", r.stdout
    assert got["socket"] == got["helper"] == "WARN"
    assert "groupadd" in r.stdout and "apt install qemu-system-x86" in r.stdout
    assert r.returncode == 1
    bad = helper_check("[server]\nsocket_mode = 4096\n")
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL  config"), bad.stdout


def test_doctor_all_good_for_a_group_member(env: McpEnv) -> None:
    r = user_cli(USER, [GROUP], env.config, "doctor")
    got = lines_of(r.stdout)
    assert set(got.values()) == {"PASS"}, r.stdout + r.stderr
    assert list(got) == ["config", "state-dir", "socket", "permission", "helper", "images"]
    assert f"uid {USER}" in r.stdout and r.stdout.rstrip().endswith("you can use agentiso")
    assert r.returncode == 0


def test_doctor_without_permission_on_the_socket(env: McpEnv) -> None:
    cfg = user_config(env, "outsider", OUTSIDER, env.helper.socket)
    r = user_cli(OUTSIDER, [], cfg, "doctor")
    got = lines_of(r.stdout)
    assert got["permission"] == "FAIL" and got["helper"] == got["images"] == "SKIP", r.stdout
    assert [n for n, s in got.items() if s == "FAIL"] == ["permission"]
    assert f"are not in group {GROUP}" in r.stdout and "usermod -aG" in r.stdout
    assert r.returncode == 1
    # status says the helper is not reachable and points to doctor.
    s = user_cli(OUTSIDER, [], cfg, "status")
    assert s.returncode == 1 and "NOT reachable" in s.stdout and "agentiso doctor" in s.stdout
    # With a socket anyone may open, the helper itself refuses the outsider.
    os.chmod(env.helper.socket, 0o666)
    try:
        r = user_cli(OUTSIDER, [], cfg, "doctor")
    finally:
        os.chmod(env.helper.socket, 0o660)
    got = lines_of(r.stdout)
    assert got["permission"] == "PASS" and got["helper"] == "FAIL", r.stdout + r.stderr
    assert "the helper refused you" in r.stdout and "permission_denied" in r.stdout
    assert r.returncode == 1


def test_doctor_when_the_helper_is_unreachable(env: McpEnv) -> None:
    d = public_tmpdir("agentiso-deadsock-")
    try:
        stale = d / "helper.sock"  # a socket file nobody listens on (a helper that died)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(stale))
        s.close()
        os.chmod(stale, 0o666)
        r = user_cli(USER, [GROUP], user_config(env, "stale", USER, stale), "doctor")
        got = lines_of(r.stdout)
        assert got["helper"] == "FAIL" and got["images"] == "SKIP", r.stdout + r.stderr
        assert [n for n, s in got.items() if s == "FAIL"] == ["helper"]
        assert "Connection refused" in r.stdout and "agentiso-helper check" in r.stdout
        assert r.returncode == 1

        r = user_cli(USER, [GROUP], user_config(env, "nosock", USER, d / "none.sock"), "doctor")
        got = lines_of(r.stdout)
        assert got["socket"] == "FAIL" and got["permission"] == "SKIP", r.stdout
        assert "does not exist" in r.stdout and "agentiso-helper.socket" in r.stdout
        assert r.returncode == 1
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_doctor_reports_a_bad_config(env: McpEnv) -> None:
    cfg = user_config(env, "badcfg", USER, env.helper.socket)
    cfg.write_text(cfg.read_text() + "[defaults]\nvcpus = 0\n")
    r = user_cli(USER, [GROUP], cfg, "doctor")
    got = lines_of(r.stdout)
    assert got["config"] == "FAIL" and "vcpus" in r.stdout, r.stdout + r.stderr
    # The rest is still checked, with the defaults.
    assert got["helper"] == "PASS" and r.returncode == 1


def test_doctor_reports_a_state_dir_i_cannot_write(env: McpEnv) -> None:
    cfg = user_config(env, "rostate", USER, env.helper.socket)
    root_only = public_tmpdir("agentiso-rostate-")  # 0755 root: others cannot create in it
    try:
        cfg.write_text(f'helper_socket = "{env.helper.socket}"\n'
                       f'state_dir = "{root_only / "state"}"\n')
        r = user_cli(USER, [GROUP], cfg, "doctor")
    finally:
        root_only.rmdir()
    got = lines_of(r.stdout)
    assert got["state-dir"] == "FAIL" and "not writable by you" in r.stdout, r.stdout
    assert [n for n, s in got.items() if s == "FAIL"] == ["state-dir"] and r.returncode == 1


@pytest.fixture(scope="module")
async def workspace(env: McpEnv) -> AsyncIterator[Tools]:
    async with mcp_tools(env.params()) as t:
        await t.call("workspace_create", name="cli-ws")
        yield t
        await t.call("workspace_destroy", workspace="cli-ws")


@pytest.mark.anyio
async def test_status_and_list_show_my_workspaces(env: McpEnv, workspace: Tools) -> None:
    info = await workspace.call("workspace_info", workspace="cli-ws")
    listed = user_cli(USER, [GROUP], env.config, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(ln for ln in listed.stdout.splitlines() if ln.startswith("cli-ws "))
    cols = row.split()
    assert cols[2:4] == ["running", "running"], listed.stdout
    assert info["address"] and info["address"] in row and info["id"] == cols[1], listed.stdout
    status = user_cli(USER, [GROUP], env.config, "status")
    assert status.returncode == 0, status.stderr
    assert "reachable" in status.stdout and f"uid {USER}" in status.stdout
    assert "workspaces: 1, 1 running" in status.stdout and "cli-ws" in status.stdout
    # Another uid of the group sees none of them.
    other = user_cli(OUTSIDER, [GROUP], user_config(env, "other", OUTSIDER, env.helper.socket),
                     "list")
    assert other.returncode == 0 and other.stdout.strip() == "no workspaces", other.stdout
    # The admin list names the owner and the workspace's VM with its state.
    admin = await anyio.run_process(
        [sys.executable, "-m", "agentiso.privhelper.cli", "list", "--socket",
         str(env.helper.socket)], cwd=REPO)
    admin_out = admin.stdout.decode()
    vm = cols[1]
    assert any(ln.split()[:2] == [str(USER), vm] and "running" in ln
               for ln in admin_out.splitlines()), admin_out
    # Root's status adds the totals per owner: 1 VM, running, its vCPU and memory.
    root_status = (await anyio.run_process(
        [sys.executable, "-m", "agentiso.privhelper.cli", "status", "--socket",
         str(env.helper.socket)], cwd=REPO)).stdout.decode()
    totals = next(ln.split() for ln in root_status.splitlines() if ln.startswith(f"{USER} "))
    assert totals[1:5] == ["1", "1", "1", "256M"], root_status
    # Logs by the VM's name and owner, as list shows them.
    logs = (await anyio.run_process(
        [sys.executable, "-m", "agentiso.privhelper.cli", "logs", vm, "--owner", str(USER),
         "--state-dir", str(env.helper.state_dir)], cwd=REPO)).stdout.decode()
    assert "console.log" in logs and "agent" in logs, logs
