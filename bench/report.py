"""One benchmark run's figures: each ``*_bench`` module records what it measured
into a part file, and ``python -m bench`` merges the parts into
``build/bench/results.json`` and a Markdown table (``results.md``), each
agentiso figure beside its floor as a ratio.

The I/O is two small edges (:func:`record` writes one part, :func:`load_parts`
reads them); the table is a pure function of the parts (:func:`summary_rows`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Where a run's parts go; ``python -m bench`` sets it for the modules it runs.
OUT_ENV = "AGENTISO_BENCH_OUT"

Parts = Mapping[str, Mapping[str, Any]]


def out_dir() -> Path:
    return Path(os.environ.get(OUT_ENV) or REPO / "build" / "bench")


def record(part: str, figures: Mapping[str, Any]) -> Path:
    """Write (replace) part ``part``: a flat mapping of figure name to number
    (or None when not measured), plus anything JSON can hold."""
    d = out_dir() / "parts"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{part}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(figures), indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load_parts(d: Path) -> dict[str, dict[str, Any]]:
    """Every part in ``d/parts`` (a part that cannot be read is skipped)."""
    parts: dict[str, dict[str, Any]] = {}
    for p in sorted((d / "parts").glob("*.json")):
        try:
            parts[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return parts


@dataclass(frozen=True)
class Spec:
    """One summary row: the agentiso figure ``ours`` (``part.key``), its floor
    (``part.key`` or ""), and a target on ``ours`` (``max``: at most this, or
    ``ratio_max``: ours / floor at most this)."""

    label: str
    unit: str
    ours: str
    floor: str = ""
    max: float | None = None
    ratio_max: float | None = None
    #: higher is better (rates): the ratio is still ours / floor.
    higher_better: bool = False


@dataclass(frozen=True)
class Row:
    label: str
    unit: str
    ours: float | None
    floor: float | None
    ratio: float | None
    target: str
    met: bool | None


SPECS: tuple[Spec, ...] = (
    Spec("create (cold) -> first exec", "s", "mcp.create_to_exec", "vm.boot_to_hello", max=4.0),
    Spec("create (template) -> first exec", "s", "mcp.create_template_to_exec",
         "vm.resume_to_hello", max=0.3),
    Spec("create (warm pool) -> first exec", "s", "pool.create_pool_to_exec",
         "vm.resume_to_hello", max=0.3),
    Spec("create (template, beside the pool) -> first exec", "s",
         "pool.create_template_to_exec", "vm.resume_to_hello"),
    Spec("exec `true` p50", "ms", "mcp.exec_p50_ms", "mcp.exec_raw_p50_ms", ratio_max=1.3),
    Spec("exec `true` p99", "ms", "mcp.exec_p99_ms", "mcp.exec_raw_p99_ms"),
    Spec("exec `true` p50, raw channel, own VM", "ms", "", "guest.exec_p50_ms"),
    Spec("file_write 1 MiB", "MiB/s", "mcp.write_1mib", "mcp.raw_write_1mib", higher_better=True),
    Spec("file_read 1 MiB", "MiB/s", "mcp.read_1mib", "mcp.raw_read_1mib", higher_better=True),
    Spec("file_upload 100 MiB", "MiB/s", "mcp.upload_100mib", "mcp.raw_upload_100mib",
         higher_better=True),
    Spec("file_download 100 MiB", "MiB/s", "mcp.download_100mib", "mcp.raw_download_100mib",
         higher_better=True),
    Spec("snapshot_create with memory", "s", "mcp.snap_mem", "vm.mem_save"),
    Spec("snapshot_restore with memory", "s", "mcp.restore_mem", "vm.resume_to_hello"),
    Spec("snapshot_create, disk", "s", "mcp.snap_disk"),
    Spec("snapshot_restore, disk", "s", "mcp.restore_disk"),
    Spec("live fork 1 -> first exec", "s", "mcp.live1", "vm.resume_to_hello"),
    Spec("live fork 5 -> all exec", "s", "mcp.live5"),
    Spec("fork 1 (disk snapshot) -> first exec", "s", "mcp.fork1", "vm.boot_to_hello"),
    Spec("fork 5 (disk snapshot) -> all exec", "s", "mcp.fork5"),
    Spec("workspace_destroy", "s", "mcp.destroy"),
    Spec("idle PSS per 256 MiB workspace", "MiB", "density.pss_per_ws_mib",
         "vm.idle_pss_mib", max=120.0),
    Spec("idle CPU per workspace", "%", "density.cpu_per_ws_pct"),
    Spec("idle workspaces held", "count", "density.alive_at_end", "density.count"),
)


def lookup(parts: Parts, ref: str) -> float | None:
    if not ref:
        return None
    part, _, key = ref.partition(".")
    v = parts.get(part, {}).get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def summary_rows(parts: Parts, specs: tuple[Spec, ...] = SPECS) -> list[Row]:
    rows = []
    for s in specs:
        ours, floor = lookup(parts, s.ours), lookup(parts, s.floor)
        ratio = ours / floor if ours is not None and floor else None
        target, met = "", None
        if s.max is not None:
            target = f"<= {s.max:g} {s.unit}"
            met = None if ours is None else ours <= s.max
        elif s.ratio_max is not None:
            target = f"<= {s.ratio_max:g} x floor"
            met = None if ratio is None else ratio <= s.ratio_max
        rows.append(Row(s.label, s.unit, ours, floor, ratio, target, met))
    return rows


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _cells(r: Row) -> list[str]:
    met = {None: "", True: "met", False: "NOT met"}[r.met]
    return [f"{r.label} ({r.unit})", _num(r.ours), _num(r.floor),
            "-" if r.ratio is None else f"{r.ratio:.2f}", r.target, met]


HEADER = ["what", "agentiso", "floor", "ratio", "target", ""]


def markdown(rows: list[Row], meta: Mapping[str, Any]) -> str:
    lines = ["# agentiso benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", "`-`: not measured in this run (see the run's log for why).", ""]
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in cells
    )


def results(parts: Parts, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The whole of results.json: meta, every part's raw figures, the summary."""
    return {"meta": dict(meta), "parts": {k: dict(v) for k, v in parts.items()},
            "summary": [asdict(r) for r in summary_rows(parts)]}
