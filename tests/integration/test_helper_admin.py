"""Admin commands of the real helper: list, gc (orphans a registry does not
know: a QEMU and a volume), logs, and that only root may use them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from tests.harness.images import skip_unless_image
from tests.support.helper_process import IMAGES, HelperProcess, run_as, running_helper

GROUP = 64351
USER = 64352
pytestmark = skip_unless_image("minimal")


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    with running_helper(group=GROUP, extra_args=("--images-dir", str(IMAGES))) as h:
        yield h


def cli(helper: HelperProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentiso.privhelper.cli", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_admin_requests_need_root(helper: HelperProcess) -> None:
    code = textwrap.dedent(f"""
        from agentiso.protocol import helper as hp
        from agentiso.protocol.blocking import BlockingHelperClient
        from agentiso.protocol.errors import RemoteError
        c = BlockingHelperClient({str(helper.socket)!r}, timeout=180)
        for msg in (hp.Gc(id=0, dry_run=True), hp.AdminList(id=0)):
            try:
                c.request(msg); print("ALLOWED")
            except RemoteError as e:
                print(e.code)
    """)
    r = run_as(USER, USER, [GROUP], code)
    assert r.stdout.split() == ["permission_denied", "permission_denied"], r.stderr


def test_list_gc_and_logs(helper: HelperProcess) -> None:
    code = textwrap.dedent(f"""
        from agentiso.protocol import helper as hp
        from agentiso.protocol.blocking import BlockingHelperClient
        c = BlockingHelperClient({str(helper.socket)!r}, timeout=180)
        c.request(hp.VolumeCreate(id=0, name="keep", source=hp.FromImage(image="minimal")))
        c.request(hp.VolumeCreate(id=0, name="lost", source=hp.FromImage(image="minimal")))
        c.request(hp.VmStart(id=0, name="lost-vm", volume="lost"))
    """)
    r = run_as(USER, USER, [GROUP], code, timeout=300)
    assert r.returncode == 0, r.stderr
    out = cli(helper, "list", "--socket", str(helper.socket)).stdout
    assert "lost-vm" in out and "keep" in out and str(USER) in out
    lost_vm_key = next(line.split()[2] for line in out.splitlines() if "lost-vm" in line)

    logs = cli(helper, "logs", lost_vm_key, "--state-dir", str(helper.state_dir))
    assert "console.log" in logs.stdout and "agent up" in logs.stdout

    # The registry loses the VM and the volume "lost" (as after a bad crash):
    # the QEMU and the volume become orphans.
    helper.stop()
    reg_path = helper.state_dir / "registry.json"
    reg = json.loads(reg_path.read_text())
    lost_key = next(v["key"] for v in reg["volumes"] if v["name"] == "lost")
    reg["volumes"] = [v for v in reg["volumes"] if v["name"] != "lost"]
    reg["vms"] = []
    reg_path.write_text(json.dumps(reg))
    (helper.state_dir / "vm" / "records" / f"{lost_vm_key}.json").unlink()
    helper.start()

    dry = cli(helper, "gc", "--dry-run", "--socket", str(helper.socket)).stdout
    assert "would remove: QEMU pid" in dry and lost_key in dry, dry
    assert helper.qemu_pids() == []  # no record: the engine does not know it
    done = cli(helper, "gc", "--socket", str(helper.socket)).stdout
    assert "removed: QEMU pid" in done and f"removed: volume {lost_key}" in done, done
    again = cli(helper, "gc", "--dry-run", "--socket", str(helper.socket)).stdout
    assert again.strip().endswith("0 orphan(s)"), again
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        listing = c.request(hp.AdminList(id=0))
        assert isinstance(listing, hp.AdminListing)
        assert [v.name for v in listing.volumes] == ["keep"]
