"""`make demo`'s session runs end to end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helper_process import IMAGES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not (IMAGES / "minimal" / "rootfs.img").exists(),
    reason="the minimal image is not built (make image)",
)
def test_demo_session() -> None:
    netns_before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "fork:     fork | version 1: written before the snapshot" in out
    assert "original: demo | version 2: written after" in out
    assert "original: version 1: written before the snapshot" in out
    assert "volumes left: 0" in out
    netns_after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "agentiso-demo" not in netns_after
    assert netns_after.count("\n") <= netns_before.count("\n")
