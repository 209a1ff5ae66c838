"""``make test``'s runner: the suite in a few pytest processes side by side.

Most of the suite's time is spent waiting (guests booting under TCG, idle
timers firing, QEMU starting) while a core is free, so the integration
modules run as separate pytest processes, ``--jobs`` at a time (default
``AGENTISO_TEST_JOBS`` or 2, which halves the suite's time here; 1: one
plain pytest), longest first; ``tests/unit`` is one more.
Each process is a whole pytest run: module fixtures stay per module, and the
session leak check in tests/conftest.py tells the runs' resources apart
(it already lets engineers' runs overlap).

A part's own leak check (tests/conftest.py) judges only what is provably
that part's; what belongs to no live process (an orphaned QEMU, a root
namespace nft table) is checked once, here, when every part has ended.

Each part's output goes to ``build/test-logs/<part>.log``; a line is printed
when a part ends, the whole log of a part that failed, and at the end one
summary line in pytest's own form.  Exit status: 0 when every part passed or
collected nothing (pytest's 5: e.g. a ``-k`` that selects nothing there),
else 1.  ``--jobs 1`` runs plain ``pytest tests`` as before.

Usage: ``python scripts/run_tests.py [--jobs N] [pytest args...]``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
LOGS = REPO / "build" / "test-logs"
#: Seconds each part took in a full run here (``build/test-logs/times.json``
#: of the last run is preferred when present); longest start first, so the
#: last to start are short.  Parts not listed count as DEFAULT_S.
KNOWN_S = TESTS / "part_times.json"
DEFAULT_S = 20.0
SUMMARY = re.compile(r"=+ (.*?) in ([\d.]+)s")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


@dataclass
class Result:
    part: str
    rc: int
    seconds: float
    counts: dict[str, int]


def parts(tests: Path = TESTS) -> list[str]:
    """The unit tests as one part, each integration module as another."""
    found = ["tests/unit"] if (tests / "unit").is_dir() else []
    modules = (tests / "integration").glob("test_*.py")
    found += sorted(f"tests/integration/{p.name}" for p in modules)
    return found


def order(names: list[str], times: dict[str, float]) -> list[str]:
    """Longest first (list order among equals): dynamic pulling then ends
    with the short ones, so the workers finish close together."""
    return sorted(names, key=lambda n: -times.get(n, DEFAULT_S))


def counts_of(output: str) -> dict[str, int]:
    """pytest's closing summary (``== 3 passed, 1 skipped in 2.0s ==``) as
    counts; empty when there is none (a crash, or nothing collected)."""
    found: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        if m := SUMMARY.search(line):
            for n, what in COUNT.findall(m.group(1)):
                key = "errors" if what.startswith("error") else what
                found[key] = found.get(key, 0) + int(n)
            break
    return found


def ok(rc: int) -> bool:
    return rc in (0, 5)


def summary_line(results: list[Result], seconds: float) -> str:
    total: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            total[k] = total.get(k, 0) + v
    keys = ("failed", "errors", "passed", "skipped", "deselected", "xfailed", "xpassed")
    text = ", ".join(f"{total[k]} {k}" for k in keys if total.get(k)) or "no tests ran"
    return f"{'=' * 17} {text} in {seconds:.2f}s ({len(results)} parts) {'=' * 17}"


def _load_times() -> dict[str, float]:
    for path in (LOGS / "times.json", KNOWN_S):
        try:
            return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            continue
    return {}


def _log_of(part: str) -> Path:
    return LOGS / (part.replace("/", "_") + ".log")


def _ran_tests(r: Result) -> bool:
    """Its time says how long the part takes (not a ``-k`` that ran none of it)."""
    return any(r.counts.get(k) for k in ("passed", "failed", "errors"))


def _run_part(part: str, args: list[str]) -> Result:
    log = _log_of(part)
    start = time.monotonic()
    # AGENTISO_TEST_PART: the part's own leak check judges only what is
    # provably its own (tests/conftest.py); the rest is checked at the end.
    env = {**os.environ, "AGENTISO_TEST_PART": "1"}
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "pytest", part, *args], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env).returncode
    return Result(part, rc, time.monotonic() - start, counts_of(log.read_text(errors="replace")))


def _suite_check() -> Any:
    """The host's footprint before the suite (None when not root: the
    per-run check in tests/conftest.py does not run either)."""
    if os.geteuid() != 0:
        return None
    sys.path.insert(0, str(REPO))
    from tests.conftest import suite_footprint

    return suite_footprint()


def _suite_leaks(before: Any, grace_s: float = 10.0) -> dict[str, object]:
    """What the whole suite left on the host (asked again for ``grace_s``
    while something is still going away)."""
    if before is None:
        return {}
    from tests.conftest import suite_leaks

    deadline = time.monotonic() + grace_s
    while (leaks := suite_leaks(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return dict(leaks)


def run_parallel(jobs: int, args: list[str]) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    before = _suite_check()
    times = _load_times()
    queue = order(parts(), times)
    results: list[Result] = []
    lock = threading.Lock()
    start = time.monotonic()
    print(f"running {len(queue)} parts, {jobs} at a time; logs in {LOGS}", flush=True)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                part = queue.pop(0)
            r = _run_part(part, args)
            with lock:
                results.append(r)
                word = "PASS" if ok(r.rc) else f"FAIL (exit {r.rc})"
                counts = ", ".join(f"{v} {k}" for k, v in sorted(r.counts.items())) or "nothing ran"
                print(f"[{time.monotonic() - start:6.0f} s] {word} {part}: {r.seconds:.0f} s, "
                      f"{counts}", flush=True)
                if not ok(r.rc):
                    print(_log_of(part).read_text(errors="replace"), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.update({r.part: round(r.seconds, 1) for r in results if _ran_tests(r)})
    (LOGS / "times.json").write_text(json.dumps(times, indent=1, sort_keys=True))
    failed = [r.part for r in results if not ok(r.rc)]
    leaks = _suite_leaks(before)
    print(summary_line(results, time.monotonic() - start), flush=True)
    if failed:
        print("failed parts: " + " ".join(failed), flush=True)
    if leaks:
        print(f"the test suite left these behind on the host: {leaks}", flush=True)
    return 1 if failed or leaks else 0


def main(argv: list[str]) -> int:
    jobs = int(os.environ.get("AGENTISO_TEST_JOBS", "2"))
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    if jobs <= 1:
        rc = subprocess.run([sys.executable, "-m", "pytest", "tests", *argv], cwd=REPO).returncode
        return 0 if ok(rc) else rc
    return run_parallel(jobs, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
