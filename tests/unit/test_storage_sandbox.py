"""The Landlock sandbox of root's qemu-img: a layer whose header names a host
data file makes an unconfined qemu-img resize that host file (the attack is
real), and the confined one fail without touching it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentiso.privhelper.storage import commands as cmd
from agentiso.privhelper.storage import sandbox
from tests.support.qcow2_attack import rewrite_header

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img"),
    pytest.mark.skipif(not sandbox.available(), reason="Landlock is not available on this kernel"),
]


def chain(tmp: Path) -> tuple[Path, Path]:
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(base),
                    "-F", "qcow2", str(top), "64M"], check=True)
    return base, top


def test_wrap_is_a_standalone_script_call() -> None:
    argv = sandbox.wrap(["qemu-img", "info"], ro=[Path("/a")], rw=[Path("/b")])
    assert argv[:3] == [sys.executable, "-I", "-S"]
    assert argv[3].endswith("storage/sandbox.py")
    assert argv[4:] == ["--ro", "/a", "--rw", "/b", "--", "qemu-img", "info"]


def test_confined_qemu_img_works_on_its_files_and_cannot_open_a_header_data_file(
    tmp_path: Path,
) -> None:
    base, top = chain(tmp_path)
    resize = cmd.qemu_img_resize_pinned([top, base], 128 << 20)
    r = subprocess.run(sandbox.wrap(resize, ro=[base], rw=[top]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    host = tmp_path / "host.img"
    host.write_bytes(b"HOST " * 1000)
    before = hashlib.sha256(host.read_bytes()).hexdigest()
    rewrite_header(top, backing=str(base), backing_format="qcow2", data_file=str(host))
    grow = cmd.qemu_img_resize_pinned([top, base], 256 << 20)
    r = subprocess.run(sandbox.wrap(grow, ro=[base], rw=[top]), capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    assert hashlib.sha256(host.read_bytes()).hexdigest() == before

    # Unconfined, the same root command resizes the host file: what the
    # header check and this sandbox exist to prevent.
    r = subprocess.run(grow, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert host.stat().st_size == 256 << 20


def test_a_confined_command_reads_no_other_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    r = subprocess.run(sandbox.wrap(["cat", str(secret)], ro=[], rw=[]),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(sandbox.wrap(["cat", str(secret)], ro=[secret], rw=[]),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "s"


@pytest.mark.parametrize("args", [[], ["--", ], ["--xx", "/a", "--", "true"], ["--ro"]])
def test_bad_arguments_fail_closed(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-I", "-S", sandbox.__file__, *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
