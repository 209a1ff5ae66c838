"""A private helper and an unprivileged user's config, for tests that drive
``agentiso serve`` (one per test module).

:func:`mcp_env` pins the ``minimal`` image (plus any extra image directories a
test makes), starts a helper in its own network namespace with the user's
group allowed, and writes the user's ``config.toml`` (socket, state dir,
extra TOML such as quotas).  :class:`McpEnv` starts servers as that user and
looks at what the helper holds for them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.client.stdio import StdioServerParameters

from agentiso.privhelper.net.config import NetConfig
from agentiso.privhelper.net.store import STATE_FILE_NAME
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness.images import pin_image
from tests.support.helper_process import IMAGES, HelperProcess, public_tmpdir, running_helper
from tests.support.mcp_client import serve_params


@dataclass(frozen=True)
class HelperNetwork:
    """The network state a failed or undone create must leave as it found."""

    links: frozenset[str]
    ruleset: str
    leases: dict[str, Any]


@dataclass
class McpEnv:
    helper: HelperProcess
    work: Path
    config: Path
    group: int
    user: int

    @property
    def host(self) -> Path:
        """A host directory of the user's, the one host root when asked for."""
        return self.work / "host"

    def params(
        self, config: Path | None = None, *, uid: int | None = None
    ) -> StdioServerParameters:
        """``agentiso serve`` as ``uid`` (default: the env's user) in the helper's group."""
        uid = self.user if uid is None else uid
        return serve_params(config or self.config, uid=uid, gid=uid, groups=(self.group,),
                            home=self.work)

    def helper_names(self) -> tuple[set[str], set[str]]:
        """The VMs and volumes the helper holds for the user (a listing
        during a create leaves out the volume whose disk is being made:
        test_helper_volumes.py::test_a_listing_during_creates_and_destroys_never_fails)."""
        with BlockingHelperClient(str(self.helper.socket), timeout=60) as c:
            vms = c.request(hp.VmList(id=0, owner=self.user))
            vols = c.request(hp.VolumeList(id=0, owner=self.user))
        assert isinstance(vms, hp.Vms) and isinstance(vols, hp.Volumes)
        return {v.name for v in vms.vms}, {v.name for v in vols.volumes}

    def helper_network(self) -> HelperNetwork:
        """What the helper holds of the network in its namespace: its per-VM
        links (TAPs), its nftables ruleset and its address leases."""
        ns = self.helper.netns
        links = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                               text=True, check=True, timeout=30).stdout
        # "3: tap-x@if2: <...>": the name is the second field, before any "@".
        names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
        ruleset = subprocess.run(["ip", "netns", "exec", ns, "nft", "-s", "list", "ruleset"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
        state = self.helper.state_dir / STATE_FILE_NAME
        leases = json.loads(state.read_text())["workspaces"] if state.exists() else {}
        # The loopback and the shared bridge are not any one VM's.
        shared = {"lo", NetConfig().bridge}
        return HelperNetwork(frozenset(names - shared), ruleset, leases)

    def live_sessions(self) -> dict[str, int]:
        """The catalog's open sessions: session id → ``agentiso serve`` pid."""
        db = sqlite3.connect(self.work / "state" / "catalog.db")
        try:
            rows = db.execute("SELECT id, pid FROM sessions WHERE ended_at IS NULL").fetchall()
        finally:
            db.close()
        return dict(rows)

    def the_server(self) -> int:
        """The pid of the one ``agentiso serve`` of this env that is running."""
        alive = [p for p in self.live_sessions().values() if Path(f"/proc/{p}").exists()]
        assert len(alive) == 1, f"not one live server: {alive}"
        return alive[0]

    def host_curl(self, port: int, path: str = "") -> subprocess.CompletedProcess[str]:
        """``curl 127.0.0.1:port`` on the helper's host (its network namespace)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.helper.netns, "curl", "-s", "-m", "10",
             f"http://127.0.0.1:{port}/{path}"],
            capture_output=True, text=True, timeout=30,
        )


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no VmHWM")


@contextmanager
def mcp_env(
    *, group: int, user: int, helper_config: str, user_config: str = "",
    host_root: bool = False, more_images: Callable[[Path], None] | None = None,
) -> Iterator[McpEnv]:
    """The helper (``helper_config``: its TOML) and the user's config
    (``user_config``: TOML appended after the socket, the state dir and, with
    ``host_root``, ``host_roots`` naming :attr:`McpEnv.host`)."""
    images = public_tmpdir("agentiso-mcp-img-")
    try:
        pin_image(IMAGES / "minimal", images / "minimal")
        if more_images is not None:
            more_images(images)
        with running_helper(group=group, extra_args=("--images-dir", str(images)),
                            config=helper_config) as helper:
            work = public_tmpdir("agentiso-mcp-")
            try:
                for p in (work, work / "state", work / "host"):
                    p.mkdir(exist_ok=True)
                    os.chown(p, user, user)
                roots = f'host_roots = ["{work / "host"}"]\n' if host_root else ""
                config = work / "config.toml"
                config.write_text(
                    f'helper_socket = "{helper.socket}"\nstate_dir = "{work / "state"}"\n'
                    + roots + user_config
                )
                yield McpEnv(helper, work, config, group, user)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(images, ignore_errors=True)
