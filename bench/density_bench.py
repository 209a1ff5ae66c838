"""Density: N idle workspaces at once, through the real MCP client, held a while.

Creates ``AGENTISO_BENCH_DENSITY_COUNT`` (default 20) 256 MiB workspaces one by
one through ``agentiso serve`` against a private helper (the first boots cold
and has the helper build a boot template; the rest resume it), stopping early when the
host's available memory would fall under a reserve (so "fewer where memory runs
out"); runs ``true`` in each; lets them settle; then holds them
``AGENTISO_BENCH_DENSITY_HOLD`` seconds (default 300), printing progress each
minute.  ``AGENTISO_BENCH_TB_SIZE_MIB`` sets the helper's TCG translation cache
per VM (``[vm] tb_size_mib``; unset: the engine's default).  Measures each QEMU's PSS
(shared pages counted once across the VMs)
and RSS at the start and the end of the hold, and the CPU the idle VMs used
during it.  At the end every workspace must still answer an exec; then all are
destroyed.  Records part "density" (:mod:`bench.report`).

Needs root and ``make image``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench import report
from bench.mcp_bench import ready_templates
from bench.procfs import cpu_seconds, pss_kib, rss_kib
from tests.harness.images import image_dir, unusable_reason
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper
from tests.support.mcp_client import ToolFailed, Tools, mcp_tools, serve_params

MEMORY_MIB = 256
#: Host memory left for everything else when deciding whether one more fits.
RESERVE_MIB = 1024
SETTLE_S = 15.0


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_figures(pids: list[int]) -> tuple[float, float]:
    """(mean PSS MiB, mean RSS MiB) over the live ``pids``."""
    pss = [p / 1024 for p in map(pss_kib, pids) if p >= 0]
    rss = [r / 1024 for r in map(rss_kib, pids) if r >= 0]
    return (statistics.mean(pss) if pss else -1.0, statistics.mean(rss) if rss else -1.0)


async def exec_all(tools: Tools, names: list[str]) -> int:
    """How many of ``names`` answer ``true`` with exit code 0."""
    ok = 0
    for n in names:
        try:
            r = await tools.call("exec", workspace=n, command="true")
            ok += r["exit_code"] == 0
        except ToolFailed as exc:
            print(f"  {n}: exec failed: {str(exc).splitlines()[0]}", flush=True)
    return ok


async def wait_template(helper: HelperProcess, timeout: float = 300.0) -> None:
    t = time.perf_counter()
    while not await anyio.to_thread.run_sync(ready_templates, str(helper.socket)):
        if time.perf_counter() - t > timeout:
            print(f"  no template within {timeout:.0f} s: all cold", flush=True)
            return
        await anyio.sleep(0.5)
    print(f"  template ready after {time.perf_counter() - t:.1f} s", flush=True)


async def run(tools: Tools, helper: HelperProcess, count: int, hold: float) -> dict[str, Any]:
    out: dict[str, Any] = {"requested": count, "hold_s": hold, "memory_mib": MEMORY_MIB,
                           "tb_size_mib": env_int("AGENTISO_BENCH_TB_SIZE_MIB", 0) or None}
    names: list[str] = []
    creates: list[float] = []
    try:
        for i in range(count):
            if mem_available_mib() < RESERVE_MIB + 1.5 * MEMORY_MIB:
                print(f"  stopping at {i}: {mem_available_mib():.0f} MiB available", flush=True)
                break
            name = f"d{i:02d}"
            t = time.perf_counter()
            try:
                await tools.call_with("workspace_create", {"name": name}, timeout=600)
            except ToolFailed as exc:
                print(f"  stopping at {i}: create failed: {str(exc).splitlines()[0]}",
                      flush=True)
                break
            await tools.call("exec", workspace=name, command="true")
            creates.append(time.perf_counter() - t)
            names.append(name)
            if i == 0:  # it booted cold and started the template: the rest use it
                await wait_template(helper)
            print(f"  [{i + 1}/{count}] {name} up in {creates[-1]:.1f} s "
                  f"({mem_available_mib():.0f} MiB available)", flush=True)
        out["count"] = len(names)
        out["create_to_exec_median"] = statistics.median(creates) if creates else None
        out["create_to_exec_all"] = creates
        await anyio.sleep(SETTLE_S)
        pids = helper.qemu_pids()
        out["pss_per_ws_mib_start"], out["rss_per_ws_mib_start"] = memory_figures(pids)
        cpu0 = {p: cpu_seconds(p) for p in pids}
        t0 = time.monotonic()
        print(f"  holding {len(names)} idle workspaces for {hold:.0f} s: PSS "
              f"{out['pss_per_ws_mib_start']:.0f} MiB, RSS {out['rss_per_ws_mib_start']:.0f} "
              f"MiB each", flush=True)
        while (left := hold - (time.monotonic() - t0)) > 0:
            await anyio.sleep(min(60.0, left))
            alive = sum(cpu_seconds(p) >= 0 for p in pids)
            pss, _ = memory_figures(pids)
            print(f"  held {time.monotonic() - t0:.0f}/{hold:.0f} s: {alive}/{len(pids)} "
                  f"QEMUs alive, PSS {pss:.0f} MiB each, load {os.getloadavg()[0]:.2f}",
                  flush=True)
        held = time.monotonic() - t0
        used = sum(cpu_seconds(p) - c for p, c in cpu0.items() if cpu_seconds(p) >= 0)
        out["held_s"] = held
        out["cpu_per_ws_pct"] = 100 * used / held / max(1, len(pids)) if held else None
        out["pss_per_ws_mib"], out["rss_per_ws_mib"] = memory_figures(pids)
        out["pss_total_mib"] = out["pss_per_ws_mib"] * len(pids)
        out["alive_at_end"] = await exec_all(tools, names)
        print(f"  after {held:.0f} s: {out['alive_at_end']}/{len(names)} answer exec; "
              f"PSS {out['pss_per_ws_mib']:.0f} MiB, RSS {out['rss_per_ws_mib']:.0f} MiB, "
              f"CPU {out['cpu_per_ws_pct']:.2f} % each", flush=True)
    finally:
        t = time.perf_counter()
        for n in names:
            try:
                await tools.call("workspace_destroy", workspace=n)
            except ToolFailed as exc:
                print(f"  {n}: destroy failed: {str(exc).splitlines()[0]}", flush=True)
        if names:
            out["destroy_each"] = (time.perf_counter() - t) / len(names)
    return out


def main() -> int:
    reason = "needs root" if os.geteuid() != 0 else unusable_reason(image_dir("minimal"))
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    count = env_int("AGENTISO_BENCH_DENSITY_COUNT", 20)
    hold = float(env_int("AGENTISO_BENCH_DENSITY_HOLD", 300))
    print(f"density: {count} idle {MEMORY_MIB} MiB workspaces through MCP, held {hold:.0f} s",
          flush=True)
    # Room for the template's own VM while it is built (uid 0, like the server).
    limits = (f"[limits]\nper_uid_memory_mib = {(count + 3) * MEMORY_MIB}\n"
              f"per_uid_vms = {count + 3}\n[templates]\nbuild = \"on-miss\"\n")
    tb = env_int("AGENTISO_BENCH_TB_SIZE_MIB", 0)
    if tb:  # TCG's translation cache per VM; first: running_helper's config opens [vm]
        limits = f"tb_size_mib = {tb}\n" + limits
    with running_helper(group=0, extra_args=("--images-dir", str(IMAGES)), config=limits
                        ) as helper:
        work = public_tmpdir("agentiso-density-bench-")
        try:
            cfg = work / "config.toml"
            cfg.write_text(f'helper_socket = "{helper.socket}"\nstate_dir = "{work}/state"\n'
                           f"[quotas]\nworkspaces = {count + 2}\n"
                           f"workspaces_per_session = {count + 2}\n")

            async def go() -> dict[str, Any]:
                async with mcp_tools(serve_params(cfg)) as tools:
                    return await run(tools, helper, count, hold)

            out = anyio.run(go)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report.record("density", out)
    return 0 if out.get("alive_at_end") == out.get("count") else 1


if __name__ == "__main__":
    sys.exit(main())
