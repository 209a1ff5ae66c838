"""``make bench``: every benchmark in one run, side by side.

``python -m bench``                 all of them, floor first
``python -m bench mcp density``     only those whose name starts with these words
                                    (the other parts of the last run are kept)

Each ``bench/*_bench.py`` runs in its own process, prints its own figures as it
goes and records them (:mod:`bench.report`); at the end the parts are merged
into ``build/bench/results.json`` and ``build/bench/results.md`` and the summary
table (each agentiso figure beside its floor, as a ratio, and the targets) is
printed.

Environment: ``AGENTISO_BENCH_DENSITY_COUNT`` (idle workspaces, default 20) and
``AGENTISO_BENCH_DENSITY_HOLD`` (seconds they are held, default 300);
``AGENTISO_BENCH_OUT`` (default build/bench).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report

HERE = Path(__file__).resolve().parent
#: The floor first (raw QEMU, raw channel), then agentiso through MCP, then
#: density (the longest), then the component benchmarks.
ORDER = ("vm_bench", "guest_bench", "mcp_bench", "density_bench")


def module_names(argv: list[str]) -> list[str]:
    found = {p.stem for p in HERE.glob("*_bench.py")}
    names = [n for n in ORDER if n in found] + sorted(found - set(ORDER))
    if argv:
        names = [n for n in names if any(n.startswith(a) for a in argv)]
    return names


def meta(started: float, names: list[str], failed: list[str]) -> dict[str, object]:
    def cmd(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return out.splitlines()[0].strip() if out else "?"

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": cmd("git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"),
        "host": f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}",
        "qemu": cmd("qemu-system-x86_64", "--version"),
        "load average at start": f"{os.getloadavg()[0]:.2f}",
        "wall time": f"{time.monotonic() - started:.0f} s",
        "ran": ", ".join(names),
        "failed": ", ".join(failed) or "none",
    }


def main(argv: list[str]) -> int:
    names = module_names(argv)
    out = report.out_dir()
    if not argv:  # a full run starts clean: no stale part mixes in
        shutil.rmtree(out / "parts", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{report.OUT_ENV: str(out)})
    failed: list[str] = []
    started = time.monotonic()
    for i, name in enumerate(names, 1):
        print(f"\n=== [{i}/{len(names)}] {name} "
              f"(at {time.monotonic() - started:.0f} s) ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent, env=env)
        print(f"--- [{i}/{len(names)}] {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} "
              f"in {time.monotonic() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(name)
    parts = report.load_parts(out)
    m = meta(started, names, failed)
    (out / "results.json").write_text(json.dumps(report.results(parts, m), indent=1))
    rows = report.summary_rows(parts)
    (out / "results.md").write_text(report.markdown(rows, m))
    print(f"\n=== summary (also {out / 'results.md'}, {out / 'results.json'}) ===")
    print(report.text_table(rows))
    missed = [r.label for r in rows if r.met is False]
    print(f"targets: {sum(r.met is True for r in rows)} met, {len(missed)} not met"
          + (f" ({'; '.join(missed)})" if missed else "")
          + f"; {sum(r.ours is None and r.floor is None for r in rows)} rows not measured")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
