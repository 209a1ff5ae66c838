"""Create from the warm pool (privhelper/vms/pool.py) through the real MCP
client, beside a create from the template.

Two private helpers in turn, the same load for both as far as a shared host
allows:

* one with templates only: a cold create builds the template, then
  ``ROUNDS`` creates resume it (``workspace_create`` then ``exec true``,
  timed to the exec's result, then destroy);
* one with ``[pool]`` of two VMs of the default shape: once the pool is
  full, ``ROUNDS`` creates, each after the pool is full again, so each
  takes a warm pool VM over (checked in the helper's log).

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
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from agentiso.privhelper.vms.templates import POOL_OWNER
from bench import report
from bench.mcp_bench import ready_templates
from tests.harness.images import image_dir, unusable_reason
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper
from tests.support.mcp_client import Tools, mcp_tools, serve_params

ROUNDS = 7
POOL_SIZE = 2
TEMPLATES = ("[limits]\nper_uid_memory_mib = 4096\nper_uid_vms = 12\n"
             "[templates]\nbuild = \"on-miss\"\n")
POOL = f"[pool]\nmemory_mib = 1024\n[[pool.shapes]]\nimage = \"minimal\"\ncount = {POOL_SIZE}\n"
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


def taken_over(helper: HelperProcess) -> int:
    return helper.log().count('"pool_taken_over"')


async def from_template(tools: Tools, helper: HelperProcess) -> list[float]:
    await tools.call("workspace_create", name="cold")  # builds the template
    await tools.call("workspace_destroy", workspace="cold")
    t = time.perf_counter()
    while not await anyio.to_thread.run_sync(ready_templates, str(helper.socket)):
        if time.perf_counter() - t > WAIT_S:
            raise RuntimeError(f"no template within {WAIT_S:.0f} s")
        await anyio.sleep(0.5)
    times = []
    for i in range(ROUNDS):
        await anyio.sleep(1)
        times.append(await create_to_exec(tools, f"tpl{i}"))
        print(f"  create from the template {i + 1}/{ROUNDS}: {times[-1]:.3f} s", flush=True)
        await tools.call("workspace_destroy", workspace=f"tpl{i}")
    return times


async def from_pool(tools: Tools, helper: HelperProcess, out: dict[str, Any]) -> list[float]:
    print(f"  waiting for the pool ({POOL_SIZE} VMs, a template build first)", flush=True)
    t = time.perf_counter()
    await wait_full(helper)
    out["pool_fill_wait"] = time.perf_counter() - t
    times = []
    for i in range(ROUNDS):
        await wait_full(helper)
        await anyio.sleep(1)  # the refill's load has passed
        before = taken_over(helper)
        times.append(await create_to_exec(tools, f"pool{i}"))
        if taken_over(helper) != before + 1:
            raise RuntimeError("a create was not served by the pool")
        print(f"  create from the pool {i + 1}/{ROUNDS}: {times[-1]:.3f} s", flush=True)
        await tools.call("workspace_destroy", workspace=f"pool{i}")
    return times


def through_mcp(config: str, fn: Callable[[Tools, HelperProcess], Awaitable[list[float]]]
                ) -> list[float]:
    with running_helper(group=0, extra_args=("--images-dir", str(IMAGES)),
                        config=config) as helper:
        work = public_tmpdir("agentiso-pool-bench-")
        try:
            (work / "host").mkdir()
            cfg = work / "config.toml"
            cfg.write_text(f'helper_socket = "{helper.socket}"\nhost_roots = ["{work}/host"]\n'
                           f'state_dir = "{work}/state"\n')

            async def go() -> list[float]:
                async with mcp_tools(serve_params(cfg)) as tools:
                    return await fn(tools, helper)

            return anyio.run(go)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    reason = "needs root" if os.geteuid() != 0 else unusable_reason(image_dir("minimal"))
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    m: dict[str, Any] = {}
    print("templates only:", flush=True)
    m["create_template"] = through_mcp(TEMPLATES, from_template)
    print("with the pool:", flush=True)
    m["create_pool"] = through_mcp(TEMPLATES + POOL, lambda t, h: from_pool(t, h, m))
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

