"""``agentiso-helper list`` / ``status``: the admin view's rendering (pure)."""

from __future__ import annotations

from agentiso.privhelper.cli import AdminView, render_listing, render_totals
from agentiso.protocol import helper as hp


def _view() -> AdminView:
    listing = hp.AdminListing(
        id=0,
        vms=[hp.AdminVm(owner=1000, name="ws-a1", key="k-vm1", volume="ws-a1", state="running",
                        vcpus=2, memory_mib=512, pid=4242, qemu_uid=3000001),
             hp.AdminVm(owner=1001, name="ws-b1", key="k-vm2", volume="ws-b1", state="stopped",
                        vcpus=1, memory_mib=256)],
        volumes=[hp.AdminVolume(owner=1000, name="ws-a1", key="k-vol1", size_bytes=1 << 30,
                                snapshots=["s1", "s2"], vm="ws-a1"),
                 hp.AdminVolume(owner=1001, name="ws-b1", key="k-vol2", size_bytes=2 << 30,
                                snapshots=[])],
    )
    net = hp.VmNetworkInfo(address="10.42.0.7", prefix=16, gateway="10.42.0.1",
                           mac="52:54:00:00:00:07", policy=hp.NetworkPolicy())
    vm_a = hp.VmInfo(id=0, name="ws-a1", volume="ws-a1", state="running", vcpus=2,
                     memory_mib=512, created=0.0, network=net)
    vol_a = hp.VolumeInfo(id=0, name="ws-a1", size_bytes=1 << 30, used_bytes=300 << 20,
                          created=0.0, origin="image:minimal")
    vol_b = hp.VolumeInfo(id=0, name="ws-b1", size_bytes=2 << 30, used_bytes=100 << 20,
                          created=0.0, origin="image:minimal")
    return AdminView(listing, vms={1000: [vm_a], 1001: []}, volumes={1000: [vol_a], 1001: [vol_b]},
                     rss_kib={4242: 200 * 1024}, names={(1000, "ws-a1"): "web"},
                     users={1000: "alice", 1001: "1001"})


def test_listing_shows_owners_names_states_and_use() -> None:
    text = render_listing(_view())
    vm_line = next(ln for ln in text.splitlines() if ln.split()[:2] == ["alice(1000)", "ws-a1"])
    cols = vm_line.split()
    assert cols[:4] == ["alice(1000)", "ws-a1", "k-vm1", "running"]
    assert "512M" in cols and "200M" in cols and "10.42.0.7" in cols and cols[-1] == "web"
    stopped = next(ln for ln in text.splitlines() if "k-vm2" in ln)
    assert stopped.split()[3] == "stopped" and stopped.split()[-1] == "-"
    vol_line = next(ln for ln in text.splitlines() if "k-vol1" in ln)
    assert "300M" in vol_line and "1024M" in vol_line and "s1,s2" in vol_line and "web" in vol_line


def test_totals_count_only_live_vms_for_cpu_and_memory() -> None:
    lines = render_totals(_view()).splitlines()
    alice = lines[1].split()
    assert alice == ["alice(1000)", "1", "1", "2", "512M", "200M", "1", "300M"]
    other = lines[2].split()
    assert other == ["1001", "1", "0", "0", "0M", "0M", "1", "100M"]
    empty = AdminView(hp.AdminListing(id=0, vms=[], volumes=[]))
    assert render_totals(empty).splitlines()[-1] == "(nothing held)"


def test_logs_take_a_key_or_an_owners_vm_name() -> None:
    from agentiso.privhelper.cli import resolve_vm_key

    vms = [("m1", 1000, "ws-a"), ("m2", 1001, "ws-a"), ("m3", 1001, "ws-b")]
    assert resolve_vm_key(vms, "m2", None) == "m2"
    assert resolve_vm_key(vms, "ws-b", None) == "m3"
    assert resolve_vm_key(vms, "ws-a", None) is None  # two owners: ambiguous
    assert resolve_vm_key(vms, "ws-a", 1001) == "m2"
    assert resolve_vm_key(vms, "ws-b", 1000) is None
    assert resolve_vm_key(vms, "nope", None) is None
