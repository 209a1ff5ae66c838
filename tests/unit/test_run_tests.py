"""``make test``'s runner (scripts/run_tests.py), its pure parts: which parts
the suite splits into, their order, and reading pytest's summary."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def runner() -> ModuleType:
    return load_script("run_tests")


def test_the_parts_are_the_unit_tests_and_each_integration_module() -> None:
    rt = runner()
    found = rt.parts()
    assert found[0] == "tests/unit"
    modules = sorted(p.name for p in (REPO / "tests" / "integration").glob("test_*.py"))
    assert found[1:] == [f"tests/integration/{m}" for m in modules]  # none forgotten


def test_longest_first_and_unknown_parts_count_as_the_default() -> None:
    rt = runner()
    times = {"a": 5.0, "b": 100.0, "c": rt.DEFAULT_S + 1}
    assert rt.order(["a", "x", "b", "c"], times) == ["b", "c", "x", "a"]


def test_the_counts_come_from_pytests_closing_line() -> None:
    rt = runner()
    out = "lots\n=== 1 failed, 2757 passed, 16 skipped, 2 errors in 966.94s (0:16:06) ===\n"
    assert rt.counts_of(out) == {"failed": 1, "passed": 2757, "skipped": 16, "errors": 2}
    assert rt.counts_of("==== 1 error in 0.5s ====") == {"errors": 1}
    assert rt.counts_of("Traceback (most recent call last):\n") == {}  # a crash
    assert rt.counts_of("===== no tests ran in 0.01s =====") == {}


def test_exit_5_is_not_a_failure_and_the_summary_adds_up() -> None:
    rt = runner()
    assert rt.ok(0) and rt.ok(5) and not rt.ok(1) and not rt.ok(2)
    results = [rt.Result("a", 0, 1.0, {"passed": 3, "skipped": 1}),
               rt.Result("b", 1, 2.0, {"passed": 2, "failed": 1}),
               rt.Result("c", 5, 0.5, {})]
    line = rt.summary_line(results, 12.345)
    assert "1 failed, 5 passed, 1 skipped in 12.35s (3 parts)" in line
    assert rt.counts_of(line) == {"failed": 1, "passed": 5, "skipped": 1}
    assert "no tests ran" in rt.summary_line([results[2]], 1.0)


def test_only_a_part_that_ran_tests_teaches_its_time() -> None:
    rt = runner()
    assert rt._ran_tests(rt.Result("a", 0, 9.0, {"passed": 1}))
    assert rt._ran_tests(rt.Result("a", 1, 9.0, {"failed": 1, "deselected": 5}))
    assert not rt._ran_tests(rt.Result("a", 5, 0.5, {"deselected": 12}))  # a -k elsewhere
    assert not rt._ran_tests(rt.Result("a", 0, 0.5, {"skipped": 3}))
