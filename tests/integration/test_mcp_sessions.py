"""Sessions, network tools and quotas of ``agentiso serve``, through the real
MCP client, against a real helper and real VMs; the servers run as an
unprivileged uid in the helper's group.

* A workspace belongs to the session (``agentiso serve`` process) that made
  it: another session must adopt it first; a session killed with ``kill -9``
  leaves its workspaces adoptable with nothing lost.
* ``port_forward`` reaches a server in the guest from the host's 127.0.0.1
  (in the helper's network namespace); ``network_policy`` peers two workspaces
  that cannot talk by default; forwards come back after a restart.
* Quotas per session and per user (workspaces, vCPUs, memory, disk,
  snapshots per workspace) refuse cleanly and leave nothing behind.
* Time limits: an idle timeout stops a workspace while no ``agentiso serve``
  of the user runs, and the next workspace_list says why; a lifetime with
  on_timeout="destroy" leaves an entry saying so, which start refuses.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import anyio
import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness.images import skip_unless_image
from tests.support.mcp_client import ToolFailed, Tools, mcp_tools
from tests.support.mcp_env import McpEnv as Env
from tests.support.mcp_env import mcp_env

GROUP = 64371
USER = 64372
OTHER = 64373
pytestmark = skip_unless_image()
# Each per-user limit is above its per-session one, so that a create in a
# fresh session (session "a" holds 2 workspaces: 2 vCPUs, 512 MB, 2 GB) can
# hit either.
QUOTAS = """
[quotas]
workspaces = 3
workspaces_per_session = 2
vcpus = 6
vcpus_per_session = 3
memory_mb = 2048
memory_mb_per_session = 768
disk_gb = 12
disk_gb_per_session = 8
snapshots_per_workspace = 4
"""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with mcp_env(group=GROUP, user=USER, user_config=QUOTAS,
                 helper_config="[limits]\nper_uid_memory_mib = 2048\nper_uid_vms = 6\n") as e:
        yield e


@pytest.fixture(scope="module")
async def a(env: Env) -> AsyncIterator[Tools]:
    """The main session; it owns "owned" and "web" for the module."""
    async with mcp_tools(env.params()) as t:
        await t.call("workspace_create", name="owned")
        await t.call("workspace_create", name="web")
        yield t
        await t.call("workspace_adopt_all")
        for w in (await t.call("workspace_list"))["workspaces"]:
            await t.call("workspace_adopt", workspace=w["name"])
            await t.call("workspace_destroy", workspace=w["name"])


def _live_sessions(env: Env) -> dict[str, int]:
    import sqlite3

    db = sqlite3.connect(env.work / "state" / "catalog.db")
    try:
        return dict(db.execute("SELECT id, pid FROM sessions WHERE ended_at IS NULL"))
    finally:
        db.close()


@pytest.mark.anyio
async def test_an_idle_timeout_stops_a_workspace_with_no_frontend_running(env: Env) -> None:
    """The module's first test, before session "a" exists: once the creating
    session ends, no agentiso serve of the user runs while the timer fires."""
    async with mcp_tools(env.params()) as s:
        ws = await s.call("workspace_create", name="sleepy", idle_timeout_secs=10)
        assert ws["idle_timeout_secs"] == 10 and ws["expires_at"], ws
    assert env.live_sessions() == {}, "a frontend is still running"
    # Its session has ended and nothing uses it: the helper alone stops it.
    info = await anyio.to_thread.run_sync(wait_ended, env, ws["id"])
    assert info.state == "stopped" and info.ended is not None, info
    assert env.live_sessions() == {}, "a frontend ran while the timer fired"
    async with mcp_tools(env.params()) as later:
        listed = {w["name"]: w for w in (await later.call("workspace_list"))["workspaces"]}
        assert listed["sleepy"]["state"] == "stopped"
        assert "idle" in listed["sleepy"]["state_reason"], listed["sleepy"]
        await later.call("workspace_adopt", workspace="sleepy")
        again = await later.call("workspace_start", workspace="sleepy")
        assert again["state"] == "running"
        await later.call("workspace_destroy", workspace="sleepy")


@pytest.mark.anyio
async def test_a_session_uses_only_its_own_workspaces_until_it_adopts(
    env: Env, a: Tools
) -> None:
    known = set(_live_sessions(env))
    client = mcp_tools(env.params())
    b = await client.__aenter__()
    try:
        pid = next(p for s, p in _live_sessions(env).items() if s not in known)
        info = await b.call("workspace_info", workspace="owned")
        assert info["own_session"] is False and info["state"] == "running"
        err = await b.fails("exec", workspace="owned", command="true")
        assert "another agentiso session that is still running" in err
        assert "workspace_adopt" in err
        adopted = await b.call("workspace_adopt", workspace="owned")
        assert adopted["own_session"] is True
        await b.call("file_write", workspace="owned", path="/root/from-b.txt",
                     content="written by b\n")
        err = await a.fails("exec", workspace="owned", command="true")
        assert "workspace_adopt" in err
        # adopt_all takes only what a gone session held: b is alive, so nothing.
        assert (await a.call("workspace_adopt_all"))["workspaces"] == []
        assert (await b.call("workspace_info", workspace="owned"))["own_session"] is True
        assert (await a.call("workspace_info", workspace="owned"))["own_session"] is False
        os.kill(pid, 9)  # b dies without a word
    finally:
        try:
            await client.__aexit__(None, None, None)
        except Exception:
            pass  # the client notices its server died
    # a takes back what b held, nothing lost
    taken = await a.call("workspace_adopt_all")
    assert [w["name"] for w in taken["workspaces"]] == ["owned"]
    r = await a.call("exec", workspace="owned", command="cat /root/from-b.txt")
    assert r["stdout"] == "written by b\n"


def helper_state(env: Env) -> tuple[set[str], dict[str, list[str]]]:
    """The user's VMs in the helper, and each volume's snapshots."""
    with BlockingHelperClient(str(env.helper.socket), timeout=60) as c:
        vms = c.request(hp.VmList(id=0, owner=USER))
        vols = c.request(hp.VolumeList(id=0, owner=USER))
    assert isinstance(vms, hp.Vms) and isinstance(vols, hp.Volumes)
    return ({v.name for v in vms.vms},
            {v.name: sorted(s.name for s in v.snapshots) for v in vols.volumes})


def probe_to(ip: str) -> str:
    return (f"python3 -c \"import socket; s = socket.create_connection(('{ip}', 8000), "
            f"timeout=3); print('connected')\"")


@pytest.mark.anyio
async def test_port_forward_and_peering(env: Env, a: Tools) -> None:
    await a.call("file_write", workspace="web", path="/srv/index.txt", content="hello web\n")
    await a.call("exec_background", workspace="web",
                 command="python3 -m http.server 8000 --directory /srv")
    fwd = await a.call("port_forward", workspace="web", guest_port=8000)
    port = fwd["host_port"]
    assert 1024 <= port <= 65535
    for _ in range(50):
        got = env.host_curl(port, "index.txt")
        if got.stdout == "hello web\n":
            break
        await anyio.sleep(0.2)
    assert got.stdout == "hello web\n"
    assert fwd["external"] is False  # by default only this host (and this user) reach it
    opened = await a.call("port_forward", workspace="web", guest_port=8000, external=True)
    assert opened["external"] is True
    info = await a.call("workspace_info", workspace="web")
    assert {"host_port": port, "guest_port": 8000, "protocol": "tcp",
            "external": False} in info["forwards"]
    assert {"host_port": opened["host_port"], "guest_port": 8000, "protocol": "tcp",
            "external": True} in info["forwards"]

    # Isolated by default; peered, "owned" reaches "web".
    web_ip = (await a.call("workspace_ip", workspace="web"))["address"]
    probe = probe_to(web_ip)
    r = await a.call("exec", workspace="owned", command=probe)
    assert r["exit_code"] != 0
    pol = await a.call("network_policy", workspace="web", peers=["owned"])
    assert pol["peers"] == ["owned"] and pol["applied"]
    r = await a.call("exec", workspace="owned", command=probe)
    assert r["stdout"] == "connected\n", r
    err = await a.fails("network_policy", workspace="web", peers=["web"])
    assert "itself" in err
    err = await a.fails("network_policy", workspace="web",
                        allow=[{"cidr": "not-a-net", "ports": []}])
    assert "IP network" in err

    # The forward and the peering come back after a restart.
    await a.call("workspace_stop", workspace="web")
    await a.call("workspace_start", workspace="web")
    await a.call("exec_background", workspace="web",
                 command="python3 -m http.server 8000 --directory /srv")
    for _ in range(50):
        got = env.host_curl(port, "index.txt")
        if got.stdout == "hello web\n":
            break
        await anyio.sleep(0.2)
    assert got.stdout == "hello web\n"
    web_ip = (await a.call("workspace_ip", workspace="web"))["address"]  # may be new
    probe = probe_to(web_ip)
    r = await a.call("exec", workspace="owned", command=probe)
    assert r["stdout"] == "connected\n", r

    info = await a.call("workspace_info", workspace="web")  # the opt-in came back too
    assert {"host_port": opened["host_port"], "guest_port": 8000, "protocol": "tcp",
            "external": True} in info["forwards"]

    await a.call("port_forward_remove", workspace="web", host_port=opened["host_port"])
    rm = await a.call("port_forward_remove", workspace="web", host_port=port)
    assert rm["forwards"] == []
    assert env.host_curl(port).returncode != 0
    await a.call("network_policy", workspace="web", peers=[])


@pytest.mark.anyio
async def test_quotas_refuse_cleanly(env: Env, a: Tools) -> None:
    before = env.helper_names()
    listed = {w["name"] for w in (await a.call("workspace_list"))["workspaces"]}
    err = await a.fails("workspace_create", name="third")
    assert "workspaces per session: 2 in use + 1 asked > 2 allowed" in err
    async with mcp_tools(env.params()) as b:
        for args, want in (
            ({"memory_mb": 1600}, "memory per user: 512 MB in use + 1600 MB asked > 2048 MB"),
            ({"memory_mb": 1024}, "memory per session: 0 MB in use + 1024 MB asked > 768 MB"),
            ({"vcpus": 5}, "vcpus per user: 2 in use + 5 asked > 6 allowed"),
            ({"vcpus": 4}, "vcpus per session: 0 in use + 4 asked > 3 allowed"),
            ({"disk_gb": 11}, "disk per user: 2 GB in use + 11 GB asked > 12 GB allowed"),
            ({"disk_gb": 9}, "disk per session: 0 GB in use + 9 GB asked > 8 GB allowed"),
        ):
            err = await b.fails("workspace_create", name="big", **args)
            assert want in err, (args, err)
        await b.call("workspace_create", name="third")
        err = await b.fails("workspace_create", name="fourth")
        assert "workspaces per user: 3 in use + 1 asked > 3 allowed" in err
        await b.call("workspace_destroy", workspace="third")
    assert env.helper_names() == before
    assert {w["name"] for w in (await a.call("workspace_list"))["workspaces"]} == listed


@pytest.mark.anyio
async def test_snapshot_tree_restores_every_node(env: Env, a: Tools) -> None:
    async def put(text: str) -> None:
        """Change the state: a file's content, and one more file of its own."""
        await a.call("file_write", workspace="owned", path="/root/state.txt", content=text)
        await a.call("file_write", workspace="owned", path=f"/root/at-{text.strip()}",
                     content=text)

    async def state() -> str:
        return (await a.call("file_read", workspace="owned", path="/root/state.txt"))["content"]

    async def markers() -> list[str]:
        r = await a.call("exec", workspace="owned", command="cd /root && ls -d at-* | sort")
        return str(r["stdout"]).split()

    await put("one\n")
    await a.call("snapshot_create", workspace="owned", name="s1", description="first")
    await put("two\n")
    await a.call("snapshot_create", workspace="owned", name="s2")
    r = await a.call("snapshot_restore", workspace="owned", name="s1")
    assert r["state"] == "running" and r["discarded"], r
    assert await state() == "one\n"
    await put("three\n")
    await a.call("snapshot_create", workspace="owned", name="s3")
    files = {"s1": ["at-one"], "s2": ["at-one", "at-two"], "s3": ["at-one", "at-three"]}
    for node, want in (("s2", "two\n"), ("s3", "three\n"), ("s1", "one\n"), ("s2", "two\n")):
        await a.call("snapshot_restore", workspace="owned", name=node)
        assert await state() == want, node
        assert await markers() == files[node], node  # exactly its files, no other state's
    tree = await a.call("snapshot_list", workspace="owned")
    nodes = {n["name"]: n for n in tree["snapshots"]}
    assert nodes["s1"]["parent"] is None and sorted(nodes["s1"]["children"]) == ["s2", "s3"]
    assert nodes["s2"]["parent"] == "s1" and nodes["s3"]["parent"] == "s1"
    assert tree["head"] == "s2" and nodes["s2"]["is_head"]
    info = await a.call("workspace_info", workspace="owned")
    assert info["snapshot_count"] == len(tree["snapshots"]) == 3
    err = await a.fails("snapshot_create", workspace="owned", name="s1")
    assert "already has a snapshot" in err
    err = await a.fails("snapshot_restore", workspace="owned", name="nope")
    assert "snapshot_list" in err

    # A memory snapshot brings a running process back.
    job = await a.call("exec_background", workspace="owned", command="sleep 600")
    await a.call("snapshot_create", workspace="owned", name="mem", include_memory=True)
    await a.call("exec_kill", workspace="owned", job=job["job"], signal="KILL")
    gone = await a.call("exec", workspace="owned", command="pgrep -x sleep")
    assert gone["exit_code"] == 1, "killed after the snapshot"
    r = await a.call("snapshot_restore", workspace="owned", name="mem")
    assert r["memory_restored"] is True, r
    p = await a.call("exec", workspace="owned", command="pgrep -x sleep")
    assert p["exit_code"] == 0, "the process saved with the memory is running again"

    before = helper_state(env)
    listed = await a.call("snapshot_list", workspace="owned")
    err = await a.fails("snapshot_create", workspace="owned", name="fifth")
    assert "snapshots per workspace: 4 in use + 1 asked > 4 allowed" in err
    assert helper_state(env) == before, "the refused snapshot left something"
    assert await a.call("snapshot_list", workspace="owned") == listed

    # The listing's times, sizes and memory flags.
    nodes = {n["name"]: n for n in listed["snapshots"]}
    assert nodes["mem"]["memory"] is True
    assert [nodes[n]["memory"] for n in ("s1", "s2", "s3")] == [False] * 3
    for n in nodes.values():
        assert isinstance(n["size_bytes"], int) and n["size_bytes"] > 0, n
    times = [datetime.fromisoformat(nodes[n]["created_at"]) for n in ("s1", "s2", "s3", "mem")]
    assert times == sorted(times) and len(set(times)) == 4, times
    assert nodes["s1"]["description"] == "first"

    # Snapshots other states were built on cannot be deleted; the others can.
    err = await a.fails("snapshot_delete", workspace="owned", name="s2")
    assert "built on it" in err
    err = await a.fails("snapshot_delete", workspace="owned", name="mem")
    assert "workspace_stop" in err
    await a.call("workspace_stop", workspace="owned")
    await a.call("snapshot_delete", workspace="owned", name="mem")
    await a.call("snapshot_delete", workspace="owned", name="s3")
    await a.call("workspace_start", workspace="owned")
    names = {n["name"] for n in (await a.call("snapshot_list", workspace="owned"))["snapshots"]}
    assert names == {"s1", "s2"}
    assert (await a.call("workspace_info", workspace="owned"))["snapshot_count"] == 2


#: Valid values for the arguments besides the workspace, by name.
_VALUES: dict[str, Any] = {
    "command": "true", "job": 1, "path": "/root", "guest_path": "/root/x",
    "host_path": "x", "old_text": "a", "new_text": "b", "content": "x",
    "url": "git://198.51.100.2/x", "message": "m", "guest_port": 8000,
    "host_port": 40000, "name": "snap",
}


def _touching(props: dict[str, Any], required: list[str], ref: str,
              alt: str) -> dict[str, Any] | None:
    """Arguments that point a tool at workspace ``ref`` (None: it takes none);
    ``alt``: another reference to it, for a target beside sources."""
    args: dict[str, Any] = {k: _VALUES[k] for k in required if k in _VALUES}
    if "workspace" in props:
        args["workspace"] = ref
    elif "workspaces" in props:
        args["workspaces"] = [ref]
    elif "sources" in props:
        args.update(sources=[ref], target=alt)
    else:
        return None
    return args


def wait_ended(env: Env, vm: str) -> hp.VmInfo:
    """The helper's view of ``vm`` once a time limit has ended it (within 60 s)."""
    for _ in range(120):
        with BlockingHelperClient(str(env.helper.socket), timeout=60) as c:
            info = c.request(hp.VmGet(id=0, name=vm, owner=USER))
        assert isinstance(info, hp.VmInfo)
        if info.ended is not None:
            return info
        time.sleep(0.5)
    raise AssertionError(f"no time limit ended {vm}: {info}")


@pytest.mark.anyio
async def test_a_lifetime_that_destroys_leaves_an_honest_entry(env: Env, a: Tools) -> None:
    """on_timeout="destroy": the helper deletes VM and disk; the workspace
    stays listed as stopped with a reason saying it was destroyed, a start is
    refused with a hint, and workspace_destroy removes the entry."""
    async with mcp_tools(env.params()) as s:
        # Long enough for a cold boot on a loaded machine (the limit counts
        # from the VM's start: one that fires first fails the create).
        ws = await s.call("workspace_create", name="doomed", lifetime_secs=20,
                          on_timeout="destroy")
        assert ws["lifetime_secs"] == 20, ws
        ended = await anyio.to_thread.run_sync(wait_ended, env, ws["id"])
        assert ended.ended is not None and ended.ended.action == "destroy", ended
        assert ws["id"] not in env.helper_names()[1], "its volume is gone"
        row = {w["name"]: w for w in (await s.call("workspace_list"))["workspaces"]}["doomed"]
        assert row["state"] == "stopped", row
        assert "lifetime" in row["state_reason"] and "destroyed" in row["state_reason"], row
        assert "workspace_destroy" in row["state_reason"], row
        err = await s.fails("workspace_start", workspace="doomed")
        assert "no disk any more" in err and "workspace_destroy" in err, err
        await s.call("workspace_destroy", workspace="doomed")
        names = {w["name"] for w in (await s.call("workspace_list"))["workspaces"]}
        assert "doomed" not in names
    vms, volumes = env.helper_names()
    assert ws["id"] not in vms and ws["id"] not in volumes


@pytest.mark.anyio
async def test_another_user_sees_and_touches_nothing(env: Env, a: Tools) -> None:
    """Another uid of the helper's group, with its own agentiso serve: none of
    USER's workspaces is visible or usable through any tool, by name or id."""
    other_state = env.work / "other-state"
    other_state.mkdir()
    os.chown(other_state, OTHER, OTHER)
    cfg = env.work / "other.toml"
    cfg.write_text(f'helper_socket = "{env.helper.socket}"\nstate_dir = "{other_state}"\n')
    owned = await a.call("workspace_info", workspace="owned")
    params = env.params(cfg, uid=OTHER)
    async with mcp_tools(params) as o:
        listed = await o.call("workspace_list")
        assert listed == {"workspaces": [], "orphans": []}, listed
        tried = 0
        for tool in o.listed:
            props = tool.input_schema.get("properties", {})
            for ref, alt in (("owned", owned["id"]), (owned["id"], "owned")):
                args = _touching(props, tool.input_schema.get("required", []), ref, alt)
                if args is None:
                    continue
                try:  # a tool over several workspaces reports each one instead
                    err = json.dumps(await o.call_with(tool.name, args))
                except ToolFailed as exc:
                    err = str(exc)
                assert "no workspace" in err, (tool.name, args, err)
                tried += 1
        assert tried >= 2 * 30, tried  # every tool that takes a workspace, by name and id
        # workspace_adopt_all takes nothing of USER's either.
        assert (await o.call("workspace_adopt_all"))["workspaces"] == []
    # USER's catalog is not even readable by the other uid: its files are
    # USER's own, with no access for anyone else.
    files = list((env.work / "state").glob("catalog.db*"))
    assert env.work / "state" / "catalog.db" in files
    for path in files:
        st = path.stat()
        assert st.st_uid == USER and st.st_mode & 0o077 == 0, (path, oct(st.st_mode))
    assert (await a.call("workspace_info", workspace="owned"))["state"] == "running"
