"""Run a private agentiso-helper for a test, the way systemd would.

The helper is started by ``systemd-socket-activate`` on a socket in a fresh
world-traversable directory (so unprivileged test clients can reach it), with
its state, VM sockets and logs in that directory too.  It can be killed and
restarted (VMs survive that, by design).  At the end it is stopped by pid,
every QEMU it started is killed by pid, and the directory is removed.
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
from dataclasses import dataclass, field
from pathlib import Path

from agentiso.privhelper.vm.record import live_pids
from agentiso.protocol.blocking import BlockingHelperClient

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "build" / "images"
HELPER = [sys.executable, "-m", "agentiso.privhelper.cli"]


def public_tmpdir(prefix: str) -> Path:
    """A temp dir that unprivileged uids may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@dataclass
class HelperProcess:
    workdir: Path
    argv: list[str]
    #: The network namespace the helper (and so its bridge, TAPs, nft table
    #: and QEMUs) lives in; made for this helper and deleted after it.
    netns: str
    proc: subprocess.Popen[bytes] | None = None
    started: int = 0
    _logs: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "helper.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"helper-{self.started}.log"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def log(self) -> str:
        """Everything every incarnation of the helper logged."""
        return "".join(
            (self.workdir / f"helper-{i}.log").read_text(errors="replace")
            for i in range(1, self.started + 1)
        )

    def start(self, timeout: float = 30.0) -> None:
        self.started += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helper exited early:\n{self.log_path.read_text()}")
            try:
                with BlockingHelperClient(str(self.socket), timeout=30):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # The authorization under test must not rest on file permissions.
        os.chmod(self.socket, 0o666)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def qemu_pids(self) -> list[int]:
        """Pids of the live QEMUs this helper's engine recorded."""
        return live_pids(self.state_dir / "vm" / "records")

    def kill_vms(self) -> None:
        for pid in self.qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)


@contextmanager
def running_helper(
    *,
    group: int | str = "agentiso",
    extra_args: tuple[str, ...] = (),
    config: str = "",
    timeout: float = 30.0,
) -> Iterator[HelperProcess]:
    if shutil.which("systemd-socket-activate") is None:
        import pytest

        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    workdir = public_tmpdir("agentiso-helper-")
    netns = f"agentiso-t{os.getpid()}-{workdir.name[-6:]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    cfg = workdir / "helper.toml"
    # Private run dir for the VMs' sockets (short: socket paths <= 107 bytes).
    # No template builds behind a test's back (root-owned VMs it did not ask
    # for) unless the test asks for them with a [templates] section.
    if "[templates]" not in config:
        config += '\n[templates]\nbuild = "off"\n'
    cfg.write_text(f'[vm]\nrun_dir = "{workdir}/run"\n\n' + config)
    argv = [
        "ip", "netns", "exec", netns,
        "systemd-socket-activate", "-l", str(workdir / "helper.sock"),
        *HELPER, "serve", "--config", str(cfg), "--group", str(group),
        "--state-dir", str(workdir / "state"), *extra_args,
    ]
    helper = HelperProcess(workdir=workdir, argv=argv, netns=netns)
    try:
        helper.start(timeout)
        yield helper
    finally:
        helper.stop()
        helper.kill_vms()
        # Deleting the namespace takes its bridge, TAPs and nft table with it.
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


_PUBLIC_RUNTIME: Path | None = None


def public_runtime() -> Path:
    """A copy of what an unprivileged client needs (agentiso.protocol,
    agentiso.frontend and their pure-Python dependencies) in a directory any
    uid may read: the checkout and its venv may sit where other uids cannot
    go (CI may clone under a 0700 directory).  Made once, removed at exit."""
    global _PUBLIC_RUNTIME
    if _PUBLIC_RUNTIME is None:
        import atexit
        import importlib.util

        d = public_tmpdir("agentiso-pyrt-")
        skip = shutil.ignore_patterns("__pycache__")
        for name in ("protocol", "frontend"):
            shutil.copytree(REPO / name, d / "agentiso" / name, ignore=skip)
        for mod in ("msgspec", "anyio", "sniffio", "idna", "typing_extensions"):
            spec = importlib.util.find_spec(mod)
            if spec is None or spec.origin is None:
                continue
            origin = Path(spec.origin)
            if origin.name == "__init__.py":
                shutil.copytree(origin.parent, d / mod, ignore=skip)
            else:
                shutil.copy2(origin, d / origin.name)
        for path in [d, *d.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        atexit.register(shutil.rmtree, d, True)
        _PUBLIC_RUNTIME = d
    return _PUBLIC_RUNTIME


def run_as(uid: int, gid: int, groups: list[int], code: str, timeout: float = 30.0
           ) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` as an unprivileged uid with exactly ``groups``,
    with the project's client code from :func:`public_runtime` (the base
    interpreter, not the venv, which the uid may not be able to reach)."""
    grp_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    python = getattr(sys, "_base_executable", sys.executable)
    argv = [
        "setpriv", f"--reuid={uid}", f"--regid={gid}", *grp_arg, "--inh-caps=-all",
        python, "-c", code,
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(public_runtime())}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd="/", env=env
    )
