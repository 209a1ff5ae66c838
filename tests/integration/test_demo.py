"""`make demo`'s session runs end to end through MCP and leaves nothing behind.

The demo says where it worked (its helper's pid, network namespace and
directory); after it ends this test looks for each of them, for any process
started from that directory (QEMU included), and for bridges, TAPs and nft
tables that appeared in the host's own namespace meanwhile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.harness.images import skip_unless_image

REPO = Path(__file__).resolve().parents[2]
STEPS = 9


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def _host_nft_tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return set(out.splitlines())


@skip_unless_image("minimal")
def test_demo_session() -> None:
    links, tables = _host_links(), _host_nft_tables()
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
    # Every step printed, each with its time.
    timings = re.findall(r"^\[(\d+)\] .*\n(?:    .*\n)*?    ok +(\d+\.\d\d) s", out, re.M)
    assert [int(n) for n, _ in timings] == list(range(1, STEPS + 1)), out
    assert "MCP server: agentiso" in out and "as uid 64392" in out
    assert "/root/notes.txt: version 1: written before the snapshot" in out
    assert "    version 2: written after" in out
    assert "    demo: version 1: written before the snapshot" in out
    forks = re.findall(r"^    (demo|fork-1|fork-2): (ws-\S+) (10\.\S+) \| version 1", out, re.M)
    assert len(forks) == 3 and len({h for _, h, _ in forks}) == 3, out  # three identities
    assert len({a for _, _, a in forks}) == 3, out
    assert re.search(r"host\$ curl http://127.0.0.1:\d+/index.html -> hello from the demo", out)
    assert "workspaces left: 0" in out
    assert "helper holds for uid 64392: 0 VMs, 0 volumes" in out
    assert "left behind: nothing" in out

    m = re.search(r"^helper: pid (\d+), netns (\S+), dir (\S+)$", out, re.M)
    assert m, out
    pid, netns, work = int(m[1]), m[2], m[3]
    assert not Path(f"/proc/{pid}").exists()
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout.split()
    assert not Path(work).exists()  # and so no volume: they lived under it
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                assert work.encode() not in (p / "cmdline").read_bytes(), p.name
            except OSError:
                continue
    # Nothing in the host's own namespace (the demo's lived in its own).
    new_links = {n for n in _host_links() - links if n.startswith(("ai-", "br-agentiso"))}
    assert not new_links
    assert not {t for t in _host_nft_tables() - tables if "agentiso" in t}
