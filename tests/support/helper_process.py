"""Run a private agentiso-helper for a test, the way systemd would.

The helper is started by ``systemd-socket-activate`` on a socket in a fresh
world-traversable directory (so unprivileged test clients can reach it), with
its state in a temporary directory.  It is stopped by pid at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agentiso.protocol.blocking import BlockingHelperClient

REPO = Path(__file__).resolve().parents[2]
HELPER = [sys.executable, "-m", "agentiso.privhelper.cli"]


@dataclass
class HelperProcess:
    socket: Path
    workdir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def public_tmpdir(prefix: str) -> Path:
    """A temp dir that unprivileged uids may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@contextmanager
def running_helper(
    *,
    group: int | str = "agentiso",
    extra_args: tuple[str, ...] = (),
    config: str = "",
    timeout: float = 20.0,
) -> Iterator[HelperProcess]:
    if shutil.which("systemd-socket-activate") is None:
        import pytest

        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    workdir = public_tmpdir("agentiso-helper-")
    sock = workdir / "helper.sock"
    log_path = workdir / "helper.log"
    cfg = workdir / "helper.toml"
    cfg.write_text(config)
    argv = [
        "systemd-socket-activate",
        "-l",
        str(sock),
        *HELPER,
        "serve",
        "--config",
        str(cfg),
        "--group",
        str(group),
        "--state-dir",
        str(workdir / "state"),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"helper exited early:\n{log_path.read_text()}")
            try:
                with BlockingHelperClient(str(sock), timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # The check under test must not rest on file permissions.
        os.chmod(sock, 0o666)
        yield HelperProcess(socket=sock, workdir=workdir, proc=proc, log_path=log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def run_as(uid: int, gid: int, groups: list[int], code: str, timeout: float = 30.0
           ) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` as an unprivileged uid with exactly ``groups``."""
    grp_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    argv = [
        "setpriv", f"--reuid={uid}", f"--regid={gid}", *grp_arg, "--inh-caps=-all",
        sys.executable, "-c", code,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
