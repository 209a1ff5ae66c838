"""Create from the warm pool (privhelper/vms/pool.py) through the real MCP
client, beside a create from the template on the same helper.

A private helper with ``[pool]`` of two VMs of the default shape: once the
pool is full, ``ROUNDS`` times: ``workspace_create`` then ``exec true``,
timed to the exec's result, then destroy, then wait for the pool to be full
again (so each create finds a warm pool VM).  Then the same with the pool
drained first (two workspaces hold its VMs), so each create resumes the
template: the two paths side by side, under the same helper and load.

Prints the p50 of each and records ``pool.create_pool_to_exec`` and
``pool.create_template_to_exec``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import anyio

from agentiso.privhelper.vms.templates import POOL_OWNER
from bench import report
from tests.harness.images import image_dir, unusable_reason
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper
from tests.support.mcp_client import Tools, mcp_tools, serve_params

ROUNDS = 7
POOL_SIZE = 2
CONFIG = ("[limits]\nper_uid_memory_mib = 4096\nper_uid_vms = 12\n"
          "[templates]\nbuild = \"on-miss\"\n"
          f"[pool]\nmemory_mib = 1024\n[[pool.shapes]]\nimage = \"minimal\"\ncount = {POOL_SIZE}\n")
WAIT_S = 300.0


def ready(helper: HelperProcess) -> int:
    """Pool VMs filled and still in the pool."""
    reg = json.loads((helper.state_dir / "registry.json").read_bytes())
    pool = {m["key"] for m in reg["vms"] if m["owner"] == POOL_OWNER}
    filled = set()
    for line in helper.log().splitlines():
        if '"pool_filled"' in line:
            try:
                filled.add(json.loads(line)["vm"])
            except (ValueError, KeyError):
                continue
    return len(pool & filled)


async def wait_full(helper: HelperProcess) -> None:
    t = time.perf_counter()
    while await anyio.to_thread.run_sync(ready, helper) < POOL_SIZE:
        if time.perf_counter() - t > WAIT_S:
            raise RuntimeError(f"the pool did not fill within {WAIT_S:.0f} s")
        await anyio.sleep(0.25)


async def create_to_exec(tools: Tools, name: str) -> float:
    t = time.perf_counter()
    await tools.call("workspace_create", name=name)
    await tools.call("exec", workspace=name, command="true")
    return time.perf_counter() - t


async def run(tools: Tools, helper: HelperProcess) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print(f"  waiting for the pool ({POOL_SIZE} VMs, a template build first)", flush=True)
    t = time.perf_counter()
    await wait_full(helper)
    out["pool_fill_wait"] = time.perf_counter() - t
    pool = []
    for i in range(ROUNDS):
        await wait_full(helper)
        await anyio.sleep(2)  # the refill's load has passed
        pool.append(await create_to_exec(tools, f"pool{i}"))
        print(f"  create from the pool {i + 1}/{ROUNDS}: {pool[-1]:.3f} s", flush=True)
        await tools.call("workspace_destroy", workspace=f"pool{i}")
    out["create_pool"] = pool
    # The template beside it: drain the pool (two held workspaces), then
    # create while it refills (each refill takes several seconds).
    tpl = []
    for i in range(ROUNDS):
        await wait_full(helper)
        for j in range(POOL_SIZE):
            await tools.call("workspace_create", name=f"hold{j}")
        await anyio.sleep(2)
        tpl.append(await create_to_exec(tools, f"tpl{i}"))
        print(f"  create from the template {i + 1}/{ROUNDS}: {tpl[-1]:.3f} s", flush=True)
        for name in (f"tpl{i}", *(f"hold{j}" for j in range(POOL_SIZE))):
            await tools.call("workspace_destroy", workspace=name)
    out["create_template"] = tpl
    return out


def main() -> int:
    reason = "needs root" if os.geteuid() != 0 else unusable_reason(image_dir("minimal"))
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    with running_helper(group=0, extra_args=("--images-dir", str(IMAGES)),
                        config=CONFIG) as helper:
        work = public_tmpdir("agentiso-pool-bench-")
        try:
            (work / "host").mkdir()
            cfg = work / "config.toml"
            cfg.write_text(f'helper_socket = "{helper.socket}"\nhost_roots = ["{work}/host"]\n'
                           f'state_dir = "{work}/state"\n')

            async def go() -> dict[str, Any]:
                async with mcp_tools(serve_params(cfg)) as tools:
                    return await run(tools, helper)

            m = anyio.run(go)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    p50_pool = statistics.median(m["create_pool"])
    p50_tpl = statistics.median(m["create_template"])
    print(f"create -> first exec result through MCP, {ROUNDS} each, p50:")
    print(f"  from the warm pool   {p50_pool:.3f} s  (all: "
          f"{', '.join(f'{x:.3f}' for x in m['create_pool'])})")
    print(f"  from the template    {p50_tpl:.3f} s  (all: "
          f"{', '.join(f'{x:.3f}' for x in m['create_template'])})")
    report.record("pool", {
        "create_pool_to_exec": p50_pool, "create_pool_all": m["create_pool"],
        "create_template_to_exec": p50_tpl, "create_template_all": m["create_template"],
        "pool_fill_wait": m["pool_fill_wait"],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

