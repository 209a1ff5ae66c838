"""Issue 12 through the real MCP client: git in workspaces, exec_parallel,
workspace_prepare and workspace_merge, with real VMs on the ``dev`` image and
an unprivileged ``agentiso serve``.

A ``git daemon`` runs in an "internet" namespace routed behind the helper's
(198.51.100.2:9418), reached through each workspace's egress allow-list.
Its bare repository has a post-receive hook that prints a token, so a push's
output carries one (it must come back redacted).

One module-scoped session holds the workspaces: ``dev1`` (the git tools),
``golden`` (workspace_prepare) and its forks ``try-1..3``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from agentiso.frontend.tools_parallel import GRACE_S
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness.images import pin_image, skip_unless_image
from tests.harness.netns import NetNs, netns, uplink
from tests.support.helper_process import IMAGES, public_tmpdir
from tests.support.mcp_client import Tools, mcp_tools
from tests.support.mcp_env import McpEnv, mcp_env

GROUP = 64401
USER = 64402
SERVER = "198.51.100.2"
HOST_UPLINK = "198.51.100.1"
URL = f"git://{SERVER}/repo.git"
REPO = "/root/repo"
TOKEN = "ghp_Zx9yW8vU7tS6rQ5pO4nM3lK2jI1hG0fEdCbA"
ALLOW = [{"cidr": f"{SERVER}/32", "ports": ["9418"], "protocol": "tcp"}]
pytestmark = [skip_unless_image("minimal"), skip_unless_image("dev")]


@dataclass
class Lab:
    env: McpEnv
    internet: NetNs
    bare: Path

    def server_rev(self, ref: str) -> str:
        return subprocess.run(["git", "--git-dir", str(self.bare), "rev-parse", ref],
                              capture_output=True, text=True, check=True).stdout.strip()

    def server_log(self, fmt: str, ref: str = "HEAD") -> str:
        return subprocess.run(
            ["git", "--git-dir", str(self.bare), "log", "-1", f"--format={fmt}", ref],
            capture_output=True, text=True, check=True).stdout.strip()


def _server_repo(root: Path) -> Path:
    work = root / "seed"
    git = ["git", "-c", "user.name=seed", "-c", "user.email=seed@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README").write_text("line one\nline two\n")
    (work / "calc.txt").write_text("1 + 1\n")
    subprocess.run([*git, "-C", str(work), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "seed"], check=True)
    bare = root / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    hook = bare / "hooks" / "post-receive"
    hook.write_text(f"#!/bin/sh\necho \"deploy token={TOKEN}\"\necho \"auth {TOKEN}\"\n")
    hook.chmod(0o755)
    return bare


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    srv = public_tmpdir("agentiso-gitsrv-")
    try:
        bare = _server_repo(srv)
        with (
            mcp_env(group=GROUP, user=USER,
                    user_config='[defaults]\nimage = "dev"\n',
                    # The uplink's network is one of the host's own, which the helper
                    # blocks: exempt it, as an operator would.
                    helper_config=f'[limits]\nper_uid_memory_mib = 3072\nper_uid_vms = 10\n'
                    f'[net]\nexempt = ["{SERVER}/32"]\n',
                    more_images=lambda d: pin_image(IMAGES / "dev", d / "dev")) as env,
            netns("aigit") as internet,
        ):
            uplink(NetNs(env.helper.netns), internet, host_addr=HOST_UPLINK, net_addr=SERVER,
                   prefix=24)
            internet.spawn("git", "daemon", "--reuseaddr", "--export-all",
                           "--enable=receive-pack", f"--base-path={srv}",
                           f"--listen={SERVER}", "--port=9418", str(srv))
            for _ in range(100):
                if internet.run("git", "ls-remote", URL, check=False, timeout=10).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("git daemon did not start")
            yield Lab(env, internet, bare)
    finally:
        subprocess.run(["rm", "-rf", str(srv)], check=False)


@pytest.fixture(scope="module")
async def t(lab: Lab) -> AsyncIterator[Tools]:
    async with mcp_tools(lab.env.params()) as tools:
        await tools.call("workspace_create", name="dev1")
        await tools.call("network_policy", workspace="dev1", allow_internet=True, allow=ALLOW)
        yield tools
        for w in (await tools.call("workspace_list"))["workspaces"]:
            await tools.call("workspace_destroy", workspace=w["name"])
    vms, vols = lab.env.helper_names()
    assert not vms and not vols, (vms, vols)


async def sh(t: Tools, ws: str, cmd: str) -> str:
    r = await t.call("exec", workspace=ws, command=cmd)
    assert r["exit_code"] == 0, r
    return str(r["stdout"])


@pytest.mark.anyio
async def test_clone_change_status_diff_commit_push(lab: Lab, t: Tools) -> None:
    c = await t.call("git_clone", workspace="dev1", url=URL, path=REPO)
    assert c["commit"] == lab.server_rev("main") and c["branch"] == "main"
    await t.call("file_write", workspace="dev1", path=f"{REPO}/README",
                 content="line one\nline two\nline three\n")
    await t.call("file_write", workspace="dev1", path=f"{REPO}/new.txt", content="new\n")
    st = await t.call("git_status", workspace="dev1", path=REPO)
    assert (st["branch"], st["upstream"], st["modified"], st["untracked"], st["dirty"]) == (
        "main", "origin/main", ["README"], ["new.txt"], True)

    d = await t.call("git_diff", workspace="dev1", path=REPO)
    assert "+line three" in d["diff"] and not d["truncated"]
    s = await t.call("git_diff", workspace="dev1", path=REPO, stat=True)
    assert s["files"] == [{"path": "README", "added": 1, "deleted": 0}]
    cut = await t.call("git_diff", workspace="dev1", path=REPO, max_bytes=20)
    assert cut["truncated"] and len(cut["diff"].encode()) <= 20 and cut["total_bytes"] > 20
    one = await t.call("git_diff", workspace="dev1", path=REPO, file_path="calc.txt")
    assert one["diff"] == ""

    made = await t.call("git_commit", workspace="dev1", path=REPO, add_all=True,
                        message="Add a third line\n\nand a new file",
                        author="Agent Smith <agent@example.com>")
    assert re.fullmatch(r"[0-9a-f]{40}", made["commit"]) and made["files_changed"] == 2
    assert made["summary"] == "Add a third line"
    st = await t.call("git_status", workspace="dev1", path=REPO)
    assert not st["dirty"] and st["ahead"] == 1
    staged = await t.call("git_diff", workspace="dev1", path=REPO, staged=True)
    assert staged["diff"] == ""
    err = await t.fails("git_commit", workspace="dev1", path=REPO, message="empty")
    assert "nothing to commit" in err and len(err.splitlines()) == 2

    pushed = await t.call("git_push", workspace="dev1", path=REPO)
    assert lab.server_rev("main") == made["commit"]
    assert pushed["branch"] == "main" and "refs/heads/main" in pushed["output"]
    # The server's hook printed a token twice: both redacted.
    assert TOKEN not in pushed["output"] and "***" in pushed["output"], pushed["output"]
    assert lab.server_rev("main") == made["commit"]
    assert lab.server_log("%an") == "Agent Smith"
    st = await t.call("git_status", workspace="dev1", path=REPO)
    assert st["ahead"] == 0

    # A new branch pushed with set_upstream; a rewritten one needs force.
    await sh(t, "dev1", f"git -C {REPO} checkout -q -b feature")
    await t.call("file_write", workspace="dev1", path=f"{REPO}/f.txt", content="f\n")
    feat = await t.call("git_commit", workspace="dev1", path=REPO, add_all=True,
                        message="feature")
    pushed = await t.call("git_push", workspace="dev1", path=REPO, branch="feature",
                          set_upstream=True)
    assert lab.server_rev("feature") == feat["commit"] and pushed["branch"] == "feature"
    st = await t.call("git_status", workspace="dev1", path=REPO)
    assert (st["branch"], st["upstream"], st["ahead"]) == ("feature", "origin/feature", 0)
    await sh(t, "dev1", f"git -C {REPO} -c user.name=a -c user.email=a@b commit -q --amend "
             "-m 'feature, amended'")
    err = await t.fails("git_push", workspace="dev1", path=REPO)
    assert "rejected" in err and "force" in err.splitlines()[1], err
    await t.call("git_push", workspace="dev1", path=REPO, force=True)
    assert lab.server_log("%s", "feature") == "feature, amended"

    # branch and depth: a shallow clone of one branch.
    shallow = await t.call("git_clone", workspace="dev1", url=URL, path="/root/shallow",
                           branch="feature", depth=1)
    assert shallow["branch"] == "feature"
    assert await sh(t, "dev1", "git -C /root/shallow rev-list --count HEAD") == "1\n"


@pytest.mark.anyio
async def test_clones_outside_the_allow_list_fail_clearly(t: Tools) -> None:
    started = time.monotonic()
    for url in (f"git://{SERVER}:9419/repo.git", "git://203.0.113.9/repo.git"):
        err = await t.fails("git_clone", workspace="dev1", url=url, path="/root/other")
        assert "allow-list" in err and "network_policy" in err, err
    assert time.monotonic() - started < 20


@pytest.mark.anyio
async def test_hostile_input_is_refused_or_redacted(t: Tools) -> None:
    bad_urls = {
        f"{URL};touch /tmp/pwned": "not allowed",
        f"{URL}$(touch /tmp/pwned)": "not allowed",
        "ext::sh -c touch% /tmp/pwned": "remote helper",
        "--upload-pack=touch /tmp/pwned": "starts with '-'",
        "file:///root/repo": "scheme 'file'",
    }
    for url, words in bad_urls.items():
        err = await t.fails("git_clone", workspace="dev1", url=url, path="/root/x")
        assert words in err and len(err.splitlines()) == 2, err
    for path in ("/root/../etc", "/root/repo/../../etc", "relative/repo", "/"):
        err = await t.fails("git_status", workspace="dev1", path=path)
        assert "path" in err, err
    # A directory inside the repository is not the repository (no search upwards).
    await sh(t, "dev1", f"mkdir -p {REPO}/sub")
    err = await t.fails("git_status", workspace="dev1", path=f"{REPO}/sub")
    assert "not a git repository" in err
    for fp in ("../../etc/passwd", "/etc/passwd", "--output=/tmp/pwned"):
        err = await t.fails("git_diff", workspace="dev1", path=REPO, file_path=fp)
        assert "file_path" in err, err
    for kw in ({"remote": "--mirror"}, {"branch": "--force"}, {"branch": "a..b"}):
        err = await t.fails("git_push", workspace="dev1", path=REPO, **kw)
        assert len(err.splitlines()) == 2, err
    # A remote whose URL carries a token: whatever fails, the token is not echoed.
    await sh(t, "dev1", f"git -C {REPO} remote add tok https://bob:{TOKEN}@{SERVER}:9/r.git")
    err = await t.fails("git_push", workspace="dev1", path=REPO, remote="tok")
    assert TOKEN not in err and "***" in err, err
    for url in (f"https://bob:{TOKEN}@{SERVER}/r", f"git://bob:{TOKEN}@{SERVER}/repo.git",
                f"https://{TOKEN}@{SERVER}:9418/r.git"):
        err = await t.fails("git_clone", workspace="dev1", url=url, path="/root/y")
        assert TOKEN not in err and len(err.splitlines()) == 2, err
    r = await t.call("exec", workspace="dev1", command="ls /tmp/pwned")
    assert r["exit_code"] != 0


@pytest.mark.anyio
async def test_the_fork_loop(lab: Lab, t: Tools) -> None:
    args = dict(name="golden", git_url=URL, path=REPO, allow_internet=True, allow=ALLOW,
                setup_commands=["git config user.name Golden && git config user.email g@x",
                                "echo ready > /root/setup-done"])
    started = time.monotonic()
    got: dict[str, Any] = {}

    async def prepare() -> None:
        got["p"] = await t.call("workspace_prepare", **args)

    async with anyio.create_task_group() as tg:
        tg.start_soon(prepare)
        await anyio.sleep(1)
        # A second call while the first runs is refused, and does not disturb it.
        err = await t.fails("workspace_prepare", **args)
        assert "being prepared" in err, err
    p = got["p"]
    first = time.monotonic() - started
    assert p["ok"] and not p["reused"] and p["snapshot"] == "golden"
    assert p["commit"] == lab.server_rev("main") and len(p["steps"]) == 3
    started = time.monotonic()
    again = await t.call("workspace_prepare", **args)
    assert again["reused"] and again["id"] == p["id"] and again["steps"] == []
    assert time.monotonic() - started < first / 2
    err = await t.fails("workspace_prepare", **{**args, "setup_commands": ["true"]})
    assert "setup_commands" in err and "rebuild" in err
    err = await t.fails("workspace_prepare", **{**args, "name": "dev1"})
    assert "not a golden workspace" in err

    print(f"workspace_prepare: {first:.2f} s, again {time.monotonic() - started:.2f} s")
    started = time.monotonic()
    forks = await t.call("workspace_fork", workspace="golden", snapshot="golden", count=3,
                         name_prefix="try")
    assert forks["created"] == 3, forks
    print(f"fork x3: {time.monotonic() - started:.2f} s")
    started = time.monotonic()
    names = ["try-1", "try-2", "try-3"]
    edits = [
        "echo one > one.txt && git add one.txt && git commit -qm 'one'",
        "echo two > two.txt && git add two.txt && git commit -qm 'two' && "
        "echo 2b >> two.txt && git commit -qam 'two again'",
        "sed -i 's/line one/LINE ONE from try-3/' README && git commit -qam 'three'",
    ]
    par = await t.call("exec_parallel", workspaces=names,
                       command=[f"cd {REPO} && {e}" for e in edits])
    assert par["summary"]["succeeded"] == 3, par

    # branch-per-source: a branch each, the current branch untouched.
    m = await t.call("workspace_merge", sources=names, target="golden", path=REPO,
                     strategy="branch-per-source")
    print(f"exec_parallel commits + merge x3 (branch-per-source): "
          f"{time.monotonic() - started:.2f} s")
    assert [(s["source"], s["status"], len(s["commits"]), s["branch"]) for s in m["sources"]] \
        == [("try-1", "branch", 1, "merge/try-1"), ("try-2", "branch", 2, "merge/try-2"),
            ("try-3", "branch", 1, "merge/try-3")]
    assert m["head"] == m["base"]
    refs = await sh(t, "golden", f"git -C {REPO} for-each-ref --format='%(refname)'")
    assert "refs/heads/merge/try-2" in refs and "refs/agentiso" not in refs
    assert await sh(t, "golden", "ls /var/tmp | grep -c agentiso-merge || true") == "0\n"

    # A change in the golden workspace that try-3's commit conflicts with.
    await sh(t, "golden", f"sed -i 's/line one/LINE ONE from golden/' {REPO}/README")
    err = await t.fails("workspace_merge", sources=["try-1"], target="golden", path=REPO)
    assert "uncommitted changes" in err and "README" in err, err
    err = await t.fails("workspace_merge", sources=["try-1", "golden"], target="golden",
                        path=REPO)
    assert "also a source" in err
    await t.call("git_commit", workspace="golden", path=REPO, message="golden", add_all=True)

    m = await t.call("workspace_merge", sources=["try-1", "try-3"], target="golden",
                     path=REPO, strategy="sequential")
    one, three = m["sources"]
    assert one["status"] == "applied" and len(one["commits"]) == 1
    assert three["status"] == "conflict" and three["conflicts"] == ["README"]
    st = await t.call("git_status", workspace="golden", path=REPO)
    assert not st["dirty"] and st["conflicted"] == []
    assert await sh(t, "golden", f"cat {REPO}/one.txt") == "one\n"
    assert "from golden" in await sh(t, "golden", f"head -1 {REPO}/README")

    m = await t.call("workspace_merge", sources=["try-2"], target="golden", path=REPO,
                     strategy="cherry-pick")
    (two,) = m["sources"]
    assert two["status"] == "applied" and len(two["commits"]) == 2
    log = await sh(t, "golden", f"git -C {REPO} log --format=%s -4")
    assert log.splitlines()[:2] == ["two again", "two"]
    m = await t.call("workspace_merge", sources=["try-3"], target="golden", path=REPO,
                     strategy="cherry-pick")
    assert m["sources"][0]["status"] == "conflict" and m["sources"][0]["conflicts"] == ["README"]
    st = await t.call("git_status", workspace="golden", path=REPO)
    assert not st["dirty"] and st["commit"] == m["base"] == m["head"]


@pytest.mark.anyio
async def test_exec_parallel_is_parallel_and_a_stopped_workspace_does_not_hold_it(
    t: Tools,
) -> None:
    five = ["dev1", "golden", "try-1", "try-2", "try-3"]
    started = time.monotonic()
    await t.call("exec", workspace="dev1", command="sleep 2")
    single = time.monotonic() - started
    started = time.monotonic()
    r = await t.call("exec_parallel", workspaces=five, command="sleep 2; hostname")
    wall = time.monotonic() - started
    assert r["summary"]["succeeded"] == 5, r
    assert len({i["stdout"] for i in r["results"]}) == 5
    print(f"one exec {single:.2f} s, exec_parallel x5 {wall:.2f} s")
    # Well under 5 x one exec (the five share two loaded cores with other tests).
    assert wall < 3 * single, (wall, single)

    await t.call("workspace_stop", workspace="try-3")
    started = time.monotonic()
    seen: list[str] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append(f"{done:g}/{total:g} {message}")

    r = await t.call_with("exec_parallel", {"workspaces": five, "command": "echo ok",
                                            "timeout_secs": 20}, progress=progress)
    assert time.monotonic() - started < 20
    assert len(seen) == 5 and "try-3: not run" in " ".join(seen) and seen[-1].startswith("5/5")
    by = {i["workspace"]: i for i in r["results"]}
    assert [i["workspace"] for i in r["results"]] == five
    assert all(by[w]["ok"] and by[w]["stdout"] == "ok\n" for w in five[:4])
    bad = by["try-3"]
    assert not bad["ok"] and bad["exit_code"] is None and "stopped" in bad["error"]
    assert len(bad["error"].splitlines()) == 2
    assert r["summary"] == {**r["summary"], "total": 5, "succeeded": 4, "errors": 1,
                            "failed": 0}
    err = await t.fails("exec_parallel", workspaces=five, command=["true", "true"])
    assert "2 commands for 5 workspaces" in err


def _qemu_pid(env: McpEnv, vm: str) -> int:
    """The pid of the QEMU the test's helper runs for the user's ``vm`` (asked
    as root, through the helper's admin listing)."""
    with BlockingHelperClient(str(env.helper.socket), timeout=60) as c:
        listing = c.request(hp.AdminList(id=0))
    assert isinstance(listing, hp.AdminListing)
    pids = [v.pid for v in listing.vms if v.owner == env.user and v.name == vm and v.pid]
    assert len(pids) == 1, listing.vms
    return pids[0]


@pytest.mark.anyio
async def test_exec_parallel_gives_up_on_a_dead_workspace_at_its_timeout(
    lab: Lab, t: Tools,
) -> None:
    """A workspace whose VM is frozen (its QEMU stopped) answers nothing: its
    result is an error at the timeout (plus a short grace), the others' come
    back with theirs; a command that outlasts the timeout is killed."""
    vm = (await t.call("workspace_info", workspace="try-2"))["id"]
    pid = _qemu_pid(lab.env, vm)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = await t.call("exec_parallel", workspaces=["dev1", "try-2", "golden"],
                         command=["echo ok", "echo ok", "sleep 30"], timeout_secs=4)
        wall = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"exec_parallel with a frozen workspace, timeout 4 s: {wall:.2f} s")
    assert wall < 4 + GRACE_S + 3, wall
    ok, dead, slow = r["results"]
    assert ok["ok"] and ok["stdout"] == "ok\n"
    assert not dead["ok"] and "gave no answer" in dead["error"], dead
    assert slow["timed_out"] and not slow["ok"] and slow["error"] is None, slow
    assert (r["summary"]["succeeded"], r["summary"]["failed"], r["summary"]["errors"]) == (
        1, 1, 1)
    # Thawed, it answers again.
    assert (await t.call("exec", workspace="try-2", command="echo back"))["stdout"] == "back\n"


@pytest.mark.anyio
async def test_rebuild_with_a_failing_setup_leaves_nothing_half_prepared(
    lab: Lab, t: Tools,
) -> None:
    """Last in the module: it rebuilds (so destroys) the golden workspace."""
    before = lab.env.helper_names()
    golden_vm = (await t.call("workspace_info", workspace="golden"))["id"]
    failing = ["echo fine", "echo failing-output; echo to-stderr >&2; exit 3", "echo never"]
    p = await t.call("workspace_prepare", name="golden", git_url=URL, path=REPO,
                     allow_internet=True, allow=ALLOW, setup_commands=failing, rebuild=True)
    assert not p["ok"] and p["id"] is None and p["snapshot"] is None
    f = p["failed_step"]
    assert (f["step"], f["exit_code"], f["stdout"], f["stderr"]) == (
        failing[1], 3, "failing-output\n", "to-stderr\n")
    assert [s["step"] for s in p["steps"]] == ["clone", "echo fine"]
    names = {w["name"] for w in (await t.call("workspace_list"))["workspaces"]}
    assert "golden" not in names and {"try-1", "try-2", "try-3"} <= names
    vms, vols = lab.env.helper_names()
    assert vms == before[0] - {golden_vm}
    # Only the old golden workspace's volume may stay (its forks' disks hang on it).
    assert vols - before[1] == set()
