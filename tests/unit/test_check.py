"""``agentiso-helper check``: the pure verdicts over gathered host facts.

Each test starts from facts of a healthy host and breaks one prerequisite,
checking the line's status and that every warn and fail says what to do."""

from __future__ import annotations

import dataclasses

import pytest

from agentiso.privhelper.check import (
    HostFacts,
    Line,
    accounts_in_range,
    exit_code,
    judge,
    render,
    subid_overlaps,
)

GOOD = HostFacts(
    config_source="/etc/agentiso/helper.toml",
    qemu_path="/usr/bin/qemu-system-x86_64",
    qemu_machines="Supported machines are:\nmicrovm              microvm (i386)\npc   Standard PC",
    unprivileged_qemu=(True, "each QEMU runs as its own uid"),
    kvm_present=True, accel_kind="kvm", accel_reason="probe boot reached init",
    vhost_vsock=True, storage=(True, "qcow2 volumes"), nft_path="/usr/sbin/nft",
    tun_present=True, tun_rw=True, bridge_kind="bridge", images_dir="/img",
    images=("minimal",), run_dir=(True, "/run/agentiso/vm (private)"),
    socket_gid=4242, socket_stat=(0o660, 0, 4242, True),
    helper_answer="agentiso-helper answers", authorization="group",
)


def line(f: HostFacts, name: str) -> Line:
    return next(ln for ln in judge(f) if ln.name == name)


def broken(**changes: object) -> HostFacts:
    return dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]


def test_a_healthy_host_passes_everything() -> None:
    lines = judge(GOOD)
    assert [ln.status for ln in lines] == ["pass"] * len(lines), render(lines)
    assert exit_code(lines) == 0
    names = {ln.name for ln in lines}
    assert {"qemu", "unprivileged-qemu", "kvm", "vhost-vsock", "storage-qcow2", "nft", "tap",
            "bridge", "images", "uid-range", "run-dir", "group", "socket", "helper",
            "polkit"} <= names


@pytest.mark.parametrize("name, changes, status", [
    ("qemu", {"qemu_path": None}, "fail"),
    ("qemu", {"qemu_machines": None}, "fail"),
    ("qemu", {"qemu_machines": "Supported machines are:\npc  Standard PC\nmicrovmx x"}, "fail"),
    ("unprivileged-qemu", {"unprivileged_qemu": (False, "cannot run QEMU as uid 3004095")},
     "fail"),
    ("unprivileged-qemu", {"unprivileged_qemu": None}, "fail"),
    ("unprivileged-qemu", {"is_root": False}, "warn"),
    ("kvm", {"accel_kind": "tcg", "accel_reason": "/dev/kvm is accessible only to root"},
     "warn"),
    ("kvm", {"kvm_present": False, "accel_kind": "tcg", "accel_reason": "no /dev/kvm"}, "warn"),
    ("kvm", {"accel_kind": None, "accel_error": "KVM is configured but unusable: x"}, "fail"),
    ("vhost-vsock", {"vhost_vsock": False}, "warn"),
    ("storage-qcow2", {"storage": (False, "qemu-img not found on PATH")}, "fail"),
    ("storage-zfs", {"storage_backend": "zfs", "storage": (False, "pool tank not imported")},
     "fail"),
    ("nft", {"nft_path": None}, "fail"),
    ("nft", {"nft_error": "Operation not permitted"}, "fail"),
    ("tap", {"tun_present": False}, "fail"),
    ("tap", {"tun_rw": False}, "fail"),
    ("bridge", {"bridge_kind": "veth"}, "fail"),
    ("bridge", {"bridge_kind": "error: netlink refused"}, "fail"),
    ("images", {"images": ()}, "fail"),
    ("images", {"image_access_problem": "/img/minimal/vmlinuz is not readable by other uids"},
     "fail"),
    ("uid-range", {"uid_base": 500}, "fail"),
    ("uid-range", {"uid_count": 0}, "fail"),
    ("uid-range", {"uid_base": 2**32 - 10, "uid_count": 100}, "fail"),
    ("uid-range", {"subid_overlaps": (("/etc/subuid", "alice", 2_999_999, 65536),)}, "fail"),
    ("uid-range", {"accounts_in_range": (("odd", 3_000_005),)}, "warn"),
    ("run-dir", {"run_dir": (False, "/run/agentiso/vm is not private to the helper")}, "fail"),
    ("group", {"socket_gid": None}, "fail"),
    ("socket", {"socket_stat": None}, "warn"),
    ("socket", {"socket_stat": (0o660, 0, 4242, False)}, "fail"),
    ("socket", {"socket_stat": (0o660, 0, 0, True)}, "fail"),
    ("socket", {"socket_stat": (0o600, 0, 4242, True)}, "fail"),
    ("socket", {"socket_stat": (0o666, 0, 4242, True)}, "warn"),
    ("socket", {"socket_dir_problem": "directory /run/agentiso is not traversable"}, "fail"),
    ("helper", {"helper_answer": None, "helper_error": "connection refused"}, "warn"),
    ("polkit", {"authorization": "polkit", "pkcheck_path": None}, "fail"),
    ("polkit", {"authorization": "polkit", "pkcheck_path": "/usr/bin/pkcheck"}, "fail"),
    ("polkit", {"authorization": "polkit", "pkcheck_path": "/usr/bin/pkcheck",
                "polkit_policy": True, "polkit_answer": "unreachable"}, "fail"),
    ("polkit", {"authorization": "polkit", "pkcheck_path": "/usr/bin/pkcheck",
                "polkit_policy": True, "polkit_answer": "denied"}, "warn"),
])
def test_each_broken_prerequisite_is_reported_with_its_fix(
        name: str, changes: dict[str, object], status: str) -> None:
    lines = judge(broken(**changes))
    ln = next(x for x in lines if x.name == name)
    assert ln.status == status, ln
    assert ln.fix, f"{name}: a {status} must say what to do"
    others = [x for x in lines if x is not ln and x.status != "pass"]
    assert others == [], others
    assert exit_code(lines) == (1 if status == "fail" else 0)
    text = render(lines)
    assert f"{status.upper():<4}  {name}" in text and f"fix: {ln.fix}" in text


def test_polkit_configured_and_installed_passes() -> None:
    f = broken(authorization="polkit", pkcheck_path="/usr/bin/pkcheck", polkit_policy=True,
               polkit_answer="allowed")
    assert line(f, "polkit").status == "pass"


def test_tcg_by_choice_passes_and_this_machine_shape_warns_only() -> None:
    assert line(broken(accel_mode="tcg", accel_kind="tcg"), "kvm").status == "pass"
    # This development machine: /dev/kvm root-only, no vhost-vsock.
    f = broken(accel_kind="tcg", accel_reason="/dev/kvm is accessible only to root",
               vhost_vsock=False)
    lines = judge(f)
    bad = {ln.name: ln for ln in lines if ln.status != "pass"}
    assert set(bad) == {"kvm", "vhost-vsock"}
    assert all(ln.status == "warn" and "fallback" in ln.detail for ln in bad.values())
    assert "TCG" in bad["kvm"].detail and "virtio-serial" in bad["vhost-vsock"].detail
    assert exit_code(lines) == 0
    assert render(lines).splitlines()[-1] == f"{len(lines)} checks: {len(lines) - 2} pass, " \
        "2 warn, 0 fail"


def test_subid_overlap_parsing() -> None:
    text = "alice:100000:65536\nbob:2999000:1001\ncarol:3004096:10\nbroken line\nx:y:z\n"
    got = subid_overlaps(text, "/etc/subuid", 3_000_000, 4096)
    assert got == (("/etc/subuid", "bob", 2_999_000, 1001),)
    assert subid_overlaps("dave:3004095:1\n", "f", 3_000_000, 4096) == (("f", "dave", 3004095, 1),)
    assert subid_overlaps("", "f", 3_000_000, 4096) == ()


def test_accounts_in_range() -> None:
    entries = [("root", 0), ("a", 2_999_999), ("b", 3_000_000), ("c", 3_004_095), ("d", 3_004_096)]
    assert accounts_in_range(entries, 3_000_000, 4096) == (("b", 3_000_000), ("c", 3_004_095))
