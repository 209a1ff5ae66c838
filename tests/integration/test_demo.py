"""`make demo`'s session runs end to end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness.images import skip_unless_image

REPO = Path(__file__).resolve().parents[2]


@skip_unless_image("minimal")
def test_demo_session() -> None:
    with subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out + err
    assert "fork:     fork | version 1: written before the snapshot" in out
    assert "original: demo | version 2: written after" in out
    assert "original: version 1: written before the snapshot" in out
    assert "volumes left: 0" in out
    # The demo names its namespace after its pid; other test runs on this host
    # may have namespaces of their own at the same time.
    netns_after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"agentiso-demo-{proc.pid}" not in netns_after.split()
