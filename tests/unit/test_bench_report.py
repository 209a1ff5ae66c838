"""The benchmark's summary: figures beside their floors, ratios and targets
(pure), and the parts written and read back (bench.report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report
from bench.__main__ import module_names
from bench.report import Spec, summary_rows

SPECS = (
    Spec("exec p50", "ms", "mcp.exec", "raw.exec", ratio_max=1.3),
    Spec("create", "s", "mcp.create", "vm.boot", max=4.0),
    Spec("rate", "MiB/s", "mcp.rate", "raw.rate", higher_better=True),
    Spec("floor only", "ms", "", "raw.exec"),
)


def test_ratio_and_targets() -> None:
    parts = {"mcp": {"exec": 2.6, "create": 5.0, "rate": 50}, "raw": {"exec": 2.0, "rate": 100},
             "vm": {"boot": 4.0}}
    rows = {r.label: r for r in summary_rows(parts, SPECS)}
    assert rows["exec p50"].ratio == pytest.approx(1.3)
    assert rows["exec p50"].met is True
    assert rows["create"].ratio == pytest.approx(1.25)
    assert rows["create"].met is False  # 5 s > 4 s
    assert rows["rate"].ratio == pytest.approx(0.5)
    assert rows["rate"].met is None  # no target
    assert rows["floor only"].ours is None and rows["floor only"].floor == 2.0


def test_missing_figures_are_not_measured_not_zero() -> None:
    # A part that failed, a None, a bool and a string: none is a number.
    parts = {"mcp": {"exec": None, "create": True, "rate": "fast"}, "raw": {"exec": 0}}
    for r in summary_rows(parts, SPECS):
        assert r.ours is None
        assert r.ratio is None  # never divides by a zero floor
        assert r.met is None
    text = report.text_table(summary_rows(parts, SPECS))
    assert "NOT met" not in text and "met" not in text.split("\n", 1)[1]


def test_parts_round_trip_and_bad_part_skipped(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(report.OUT_ENV, str(tmp_path))
    report.record("mcp", {"exec": 2.5, "all": [1, 2]})
    (tmp_path / "parts" / "broken.json").write_text("{not json")
    parts = report.load_parts(tmp_path)
    assert parts == {"mcp": {"exec": 2.5, "all": [1, 2]}}
    res = report.results(parts, {"date": "today"})
    json.dumps(res)  # all of it is JSON
    assert {r["label"] for r in res["summary"]} == {s.label for s in report.SPECS}
    md = report.markdown(summary_rows(parts), {"date": "today"})
    assert md.count("\n|") == len(report.SPECS) + 2  # header, rule, one line a row


def test_every_spec_names_a_known_part() -> None:
    known = {"mcp", "vm", "guest", "density", "pool"}
    for s in report.SPECS:
        for ref in (s.ours, s.floor):
            assert not ref or ref.split(".")[0] in known, ref


def test_floor_runs_first_and_words_select() -> None:
    names = module_names([])
    assert names[:4] == ["vm_bench", "guest_bench", "mcp_bench", "density_bench"]
    assert module_names(["density", "vm"]) == ["vm_bench", "density_bench"]
