"""The world ``make demo`` runs in: a private helper and an unprivileged user.

* A private ``agentiso-helper`` with its own state directory, socket and
  network namespace (its bridge, TAPs, nft table and port forwards live there,
  so nothing on this host's network changes).  Its group is a numeric gid made
  up for the demo; the demo user is a member of it, nobody else.
* A world-readable copy of what ``agentiso serve`` imports (the checkout and
  the venv may sit where other uids cannot go), run as that user with exactly
  that group, the way an agent's MCP client would start it.

On leaving, the helper is stopped by its pid, every QEMU its engine recorded is
killed by pid, the namespace is deleted and the directory removed.
:func:`leftovers` says what, if anything, survived.
"""

from __future__ import annotations

import contextlib
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

from mcp.client.stdio import StdioServerParameters

from agentiso.privhelper.vm.record import live_pids

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "build" / "images"
#: Made-up ids: no account is created; setpriv takes numbers.
DEMO_GROUP = 64391
DEMO_USER = 64392
#: Packages of the venv that ``agentiso serve`` does not need (and large ones).
_NOT_NEEDED = ("mypy", "mypyc", "pip", "setuptools", "hypothesis", "_pytest", "pytest", "ruff",
               "pyroute2", "qemu", "__pycache__", "pkg_resources", "_distutils_hack")


@dataclass
class DemoEnv:
    work: Path
    netns: str
    helper: subprocess.Popen[bytes]
    user: int = DEMO_USER
    group: int = DEMO_GROUP

    @property
    def socket(self) -> Path:
        return self.work / "helper.sock"

    @property
    def config(self) -> Path:
        """The demo user's agentiso config."""
        return self.work / "user" / "config.toml"

    def serve_params(self) -> StdioServerParameters:
        """``agentiso serve`` as the demo user, with only the helper's group."""
        python = getattr(sys, "_base_executable", sys.executable)
        return StdioServerParameters(
            command="setpriv",
            args=[f"--reuid={self.user}", f"--regid={self.user}", f"--groups={self.group}",
                  "--inh-caps=-all", python, "-s", "-m", "agentiso.frontend.cli",
                  "--config", str(self.config), "serve"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work / "user"),
                 "PYTHONPATH": str(self.work / "runtime"), "PYTHONDONTWRITEBYTECODE": "1"},
            cwd="/",
        )

    def host_fetch(self, port: int, path: str = "") -> str:
        """``curl http://127.0.0.1:PORT/PATH`` on the helper's host (its namespace)."""
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, "curl", "-s", "-m", "5",
             f"http://127.0.0.1:{port}/{path}"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        return r.stdout


def _public_runtime(dest: Path) -> None:
    """Copy agentiso.protocol, agentiso.frontend and the venv's packages into
    ``dest``, readable by every uid."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("protocol", "frontend"):
        shutil.copytree(REPO / name, dest / "agentiso" / name, ignore=ignore)
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for entry in site.iterdir():
        if (entry.name.startswith(_NOT_NEEDED) or entry.suffix == ".pth"
                or "mypyc" in entry.name or entry.name.startswith(("__editable__", "agentiso"))):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(entry, dest / entry.name)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def demo_env(images: Path = IMAGES) -> Iterator[DemoEnv]:
    """The helper, running, and the user's config and runtime; all removed on exit."""
    work = Path(tempfile.mkdtemp(prefix="agentiso-demo-"))
    work.chmod(0o755)  # the user traverses it to the socket and its config
    netns = f"agentiso-demo-{os.getpid()}"
    helper: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        # Short socket paths for the VMs (<= 107 bytes): under the work dir.
        # No background template build: the demo's one create would pay for
        # a second boot it never uses.
        (work / "helper.toml").write_text(f'[vm]\nrun_dir = "{work}/run"\n\n'
                                          '[templates]\nbuild = "off"\n')
        with open(work / "helper.log", "wb") as log:
            helper = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "agentiso.privhelper.cli",
                 "serve", "--config", str(work / "helper.toml"), "--socket",
                 str(work / "helper.sock"), "--group", str(DEMO_GROUP),
                 "--state-dir", str(work / "state"), "--images-dir", str(images)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        env = DemoEnv(work, netns, helper)
        _wait_for_socket(env)
        user = work / "user"
        user.mkdir()
        (user / "config.toml").write_text(
            f'helper_socket = "{env.socket}"\nstate_dir = "{user / "state"}"\n')
        os.chown(user, DEMO_USER, DEMO_USER)
        _public_runtime(work / "runtime")
        yield env
    finally:
        if helper is not None:
            _stop(helper)
        for pid in live_pids(work / "state" / "vm" / "records"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Deleting the namespace takes its bridge, TAPs and nft table with it.
        subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _wait_for_socket(env: DemoEnv, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not env.socket.exists():
        if env.helper.poll() is not None or time.monotonic() > deadline:
            log = (env.work / "helper.log").read_text(errors="replace")
            raise SystemExit(f"the helper did not start:\n{log}\n"
                             "fix what it says above, then run 'make demo' again")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def leftovers(work: Path, netns: str) -> list[str]:
    """What of a finished demo still exists: its namespace (and so its TAPs,
    bridge and nft table), a QEMU or any process started from its directory,
    its directory (and so its volumes)."""
    found = []
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if netns in (line.split()[0] for line in netns_list.splitlines() if line.strip()):
        found.append(f"network namespace {netns}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(work).encode() in cmdline:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"process {proc.name}: {text}")
    if work.exists():
        found.append(f"directory {work}")
    return found
