"""``workspace_fork`` through the real MCP client, against a real helper and real VMs.

* A live fork of a running workspace into five: every fork resumes the
  original's memory with a new identity (address, MAC, hostname,
  machine-id, fresh randomness); a process started before the fork runs in
  the original and every fork at once; a write in one shows in no other;
  forks cannot reach each other by traffic unless peered or in one group.
* Forks of a disk-only snapshot boot with their own identity.
* Limits: too many forks in one call, a name taken; a snapshot with forks
  cannot be deleted.  A batch the quotas cannot hold is refused whole before
  anything is made (the live snapshot included); a batch that passes the
  quotas but meets the helper's per-uid VM limit (the hard floor under them)
  reports each fork, keeps the ones made and leaves nothing of the others;
  a live batch none of whose forks was made says that its snapshot was kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.harness.images import skip_unless_image
from tests.support.mcp_client import Tools, mcp_tools
from tests.support.mcp_env import McpEnv as Env
from tests.support.mcp_env import mcp_env

GROUP = 64381
USER = 64382
VMS = 6
pytestmark = skip_unless_image()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    # The helper allows 6 VMs (the origin and 5 live forks); the frontend's
    # quota 8 workspaces, so a batch can pass the quota and meet the helper.
    with mcp_env(group=GROUP, user=USER,
                 user_config="[quotas]\nforks_per_call = 8\nworkspaces = 8\n",
                 helper_config=f"[limits]\nper_uid_memory_mib = 3072\nper_uid_vms = {VMS}\n"
                 ) as e:
        yield e


@pytest.fixture(scope="module")
async def t(env: Env) -> AsyncIterator[Tools]:
    async with mcp_tools(env.params()) as tools:
        yield tools
        for w in (await tools.call("workspace_list"))["workspaces"]:
            await tools.call("workspace_destroy", workspace=w["name"])


@pytest.fixture(scope="module")
async def origin(t: Tools) -> dict[str, Any]:
    """The workspace both tests fork (running, with a process started before any fork)."""
    ws = await t.call("workspace_create", name="origin")
    await t.call("file_write", workspace="origin", path="/root/shared.txt", content="before\n")
    await t.call("exec_background", workspace="origin", command="sleep 3600")
    return ws


async def sh(t: Tools, ws: str, command: str) -> str:
    r = await t.call("exec", workspace=ws, command=command)
    assert r["exit_code"] == 0, (ws, command, r)
    return str(r["stdout"]).strip()


async def connects(t: Tools, ws: str, probe: str) -> None:
    """``probe`` (a TCP connect printing "connected") succeeds from ``ws``
    within 30 tries: a policy change takes a moment to apply."""
    for _ in range(30):
        r = await t.call("exec", workspace=ws, command=probe)
        if r["stdout"] == "connected\n":
            return
    raise AssertionError(f"{ws} never connected: {r}")


async def leftovers(env: Env, t: Tools) -> tuple[Any, ...]:
    """What a refused or failed fork must not change: the helper's VMs and
    volumes, the workspace list and the origin's snapshots."""
    vms, volumes = env.helper_names()
    listed = sorted((w["name"], w["id"]) for w in (await t.call("workspace_list"))["workspaces"])
    snaps = sorted(s["name"] for s in (await t.call("snapshot_list",
                                                    workspace="origin"))["snapshots"])
    return vms, volumes, listed, snaps


IDENTITY = ("hostname; cat /etc/machine-id; ip -o link show eth0 | grep -o 'ether [^ ]*'; "
            "ip -o -4 addr show eth0 | awk '{print $4}'; head -c 16 /dev/urandom | od -An -tx1")


@pytest.mark.anyio
async def test_a_live_fork_runs_everywhere_with_new_identities(
    env: Env, t: Tools, origin: dict[str, Any]
) -> None:
    result = await t.call("workspace_fork", workspace="origin", count=5, name_prefix="f")
    assert result["live"] and result["created"] == 5 and result["failed"] == 0, result
    names = ["origin", *(f["name"] for f in result["forks"])]
    assert names[1:] == ["f-1", "f-2", "f-3", "f-4", "f-5"]

    identities = {n: (await sh(t, n, IDENTITY)).split("\n") for n in names}
    for i in range(4):  # hostname, machine-id, MAC, address: each distinct
        values = [v[i] for v in identities.values()]
        assert len(set(values)) == len(values), (i, identities)
    randomness = [" ".join(v[4:]) for v in identities.values()]
    assert len(set(randomness)) == len(randomness), "forks share their random state"
    for n in names:
        assert await sh(t, n, "pgrep -x sleep >/dev/null && cat /root/shared.txt") == "before"
    info = await t.call("workspace_info", workspace="f-1")
    assert info["forked_from"] == "origin" and info["forked_at_snapshot"] == result["snapshot"]

    await sh(t, "f-1", "echo mine > /root/only-f1.txt")
    for n in names:
        if n != "f-1":
            assert await sh(t, n, "test -e /root/only-f1.txt && echo yes || echo no") == "no"

    # Isolated by traffic, unless peered.
    await t.call("exec_background", workspace="f-2",
                 command="python3 -m http.server 8000 --directory /root")
    f2 = (await t.call("workspace_ip", workspace="f-2"))["address"]
    probe = (f"python3 -c \"import socket; socket.create_connection(('{f2}', 8000), "
             f"timeout=3); print('connected')\"")
    r = await t.call("exec", workspace="f-3", command=probe)
    assert r["exit_code"] != 0
    await t.call("network_policy", workspace="f-2", peers=["f-3"])
    await connects(t, "f-3", probe)

    # A group: f-2 and f-4 opt in to "team" and talk; f-5, outside it, still cannot.
    r = await t.call("exec", workspace="f-4", command=probe)
    assert r["exit_code"] != 0, "f-4 reached f-2 before any group"
    pol = await t.call("network_policy", workspace="f-2", groups=["team"])
    assert pol["groups"] == ["team"] and pol["peers"] == ["f-3"] and pol["applied"], pol
    await t.call("network_policy", workspace="f-4", groups=["team"])
    await connects(t, "f-4", probe)
    r = await t.call("exec", workspace="f-5", command=probe)
    assert r["exit_code"] != 0, "f-5 is in no group with f-2"
    await t.call("network_policy", workspace="f-4", groups=[])
    r = await t.call("exec", workspace="f-4", command=probe)
    assert r["exit_code"] != 0, "f-4 left the group and still reaches f-2"

    err = await t.fails("snapshot_delete", workspace="origin", name=result["snapshot"])
    assert "f-1" in err
    for n in names[1:]:
        await t.call("workspace_destroy", workspace=n)


@pytest.mark.anyio
async def test_forks_of_a_disk_snapshot_boot_with_their_own_identity(
    env: Env, t: Tools, origin: dict[str, Any]
) -> None:
    await t.call("snapshot_create", workspace="origin", name="disk")
    result = await t.call("workspace_fork", workspace="origin", snapshot="disk", count=2,
                          name_prefix="cold")
    assert not result["live"] and result["created"] == 2, result
    ids = {await sh(t, n, "hostname; cat /etc/machine-id") for n in ("origin", "cold-1",
                                                                        "cold-2")}
    assert len(ids) == 3
    assert await sh(t, "cold-1", "pgrep -x sleep || echo none") == "none", "booted, not resumed"
    before = await leftovers(env, t)
    err = await t.fails("workspace_fork", workspace="origin", snapshot="disk", count=9)
    assert "limit of 8" in err
    assert await leftovers(env, t) == before
    err = await t.fails("workspace_fork", workspace="origin", snapshot="disk", count=1,
                        name_prefix="cold")
    assert "exist already" in err
    for n in ("cold-1", "cold-2"):
        await t.call("workspace_destroy", workspace=n)


@pytest.mark.anyio
async def test_a_batch_is_checked_whole_then_each_fork_meets_the_helper_floor(
    env: Env, t: Tools, origin: dict[str, Any]
) -> None:
    assert [w["name"] for w in (await t.call("workspace_list"))["workspaces"]] == ["origin"]
    before = await leftovers(env, t)

    # 1 + 8 > 8 workspaces: refused before the live snapshot is taken.
    err = await t.fails("workspace_fork", workspace="origin", count=8, name_prefix="over")
    assert "quota exceeded: workspaces per user: 1 in use + 8 asked > 8 allowed" in err, err
    assert await leftovers(env, t) == before

    # 1 + 7 fits the quota; the helper holds 6 VMs: five are made, two fail.
    batch = await t.call("workspace_fork", workspace="origin", count=7, name_prefix="h")
    assert batch["live"] and batch["created"] == VMS - 1 and batch["failed"] == 2, batch
    made = {f["name"]: f["id"] for f in batch["forks"] if f["ok"]}
    assert list(made) == [f"h-{i}" for i in range(1, VMS)], batch
    for f in batch["forks"][VMS - 1:]:
        assert not f["ok"] and f["id"] is None and f["state"] is None, f
        assert "limit reached" in f["error"] and "VMs per user" in f["error"], f
    vms, volumes, listed, snaps = await leftovers(env, t)
    assert vms == before[0] | set(made.values())
    assert volumes == before[1] | set(made.values())
    assert {n for n, _ in listed} == {"origin", *made}, "a failed fork left a row"
    assert snaps == sorted([*before[3], batch["snapshot"]])
    assert await sh(t, f"h-{VMS - 1}", "pgrep -x sleep >/dev/null && echo alive") == "alive"

    # Every fork of a batch fails at the helper: nothing of them is left.  The
    # live snapshot taken for them cannot be deleted while the origin runs on
    # its disk: it is kept, and the result says so and how to delete it.
    middle = await leftovers(env, t)
    result = await t.call("workspace_fork", workspace="origin", count=2, name_prefix="none")
    assert result["created"] == 0 and result["failed"] == 2, result
    assert result["snapshot"] in result["note"] and "snapshot_delete" in result["note"], result
    vms, volumes, listed, snaps = await leftovers(env, t)
    assert (vms, volumes, listed) == middle[:3], "a failed fork left something"
    assert snaps == sorted([*middle[3], result["snapshot"]])
    await t.call("workspace_stop", workspace="origin")
    await t.call("snapshot_delete", workspace="origin", name=result["snapshot"])

    for name in made:
        await t.call("workspace_destroy", workspace=name)
    await t.call("snapshot_delete", workspace="origin", name=batch["snapshot"])
    after = await leftovers(env, t)
    assert after[0] == set() and after[1:] == before[1:]  # the origin is stopped
