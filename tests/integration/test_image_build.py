"""The real image build's cache: a build with nothing changed does nothing.

Runs ``python -m images.build`` (as ``make image`` does) twice against the
checkout's build/ dir.  The first run brings the image up to date (normally a no-op
after ``make image``); the second must find nothing stale and leave every file
untouched.  Skipped when the image was never built: a cold build is minutes of
debootstrap, which belongs to ``make image``, not to a test.
"""

from __future__ import annotations

import subprocess
import sys

from tests.harness.images import REPO, require_image

FILES = ("vmlinuz", "initrd.img", "rootfs.img", "manifest.json")


def build() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "images.build", "--image", "minimal", "--python", sys.executable],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_second_build_with_nothing_changed_touches_nothing() -> None:
    directory = require_image("minimal", tools=()).dir
    build()
    before = {f: (directory / f).stat() for f in FILES}
    log = build()
    assert "minimal: up to date" in log, log
    after = {f: (directory / f).stat() for f in FILES}
    for f in FILES:
        assert (after[f].st_ino, after[f].st_mtime_ns) == (
            before[f].st_ino,
            before[f].st_mtime_ns,
        ), f
