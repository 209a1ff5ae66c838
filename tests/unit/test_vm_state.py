"""Pure state pieces of the VM engine: /proc parsing, records, uids, bounded logs, probe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.vm.accel import PROBE_SUCCESS, kvm_access, probe_argv
from agentiso.privhelper.vm.boundedlog import BoundedLog, cap_appended_file, tail
from agentiso.privhelper.vm.errors import InvalidVmSpec, VmLimitExceeded
from agentiso.privhelper.vm.procfs import (
    is_same_process,
    parse_cpuinfo_tsc_khz,
    parse_proc_stat,
    parse_status_groups,
    parse_status_ids,
    read_stat,
    scan_agentiso_qemus,
    vm_name_from_argv,
)
from agentiso.privhelper.vm.record import RecordStore, VmRecord, decode_record, encode_record
from agentiso.privhelper.vm.uids import UidRange, allocate_uid

from .test_vm_cmdline import make_spec

# --- /proc ---------------------------------------------------------------------------

STAT = (
    "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 2593 0 0 0 12 5 0 0 20 0 3 0 "
    "987654 1302528000 31000 18446744073709551615 1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0"
)


def test_parse_proc_stat() -> None:
    st = parse_proc_stat(STAT)
    assert (st.pid, st.state, st.ppid, st.start_time) == (4242, "S", 1, 987654)


def test_parse_proc_stat_hostile_comm() -> None:
    evil = STAT.replace("(qemu-system-x86)", "(a) R 9 9 (b c)")
    st = parse_proc_stat(evil)
    assert st.start_time == 987654 and st.state == "S"


def test_parse_proc_stat_garbage() -> None:
    with pytest.raises(ValueError):
        parse_proc_stat("no parens here")


def test_read_stat_of_self_and_dead_pid() -> None:
    me = read_stat(os.getpid())
    assert me is not None and me.pid == os.getpid()
    assert is_same_process(os.getpid(), me.start_time)
    assert not is_same_process(os.getpid(), me.start_time + 1)
    assert read_stat(2**22 + 12345) is None  # above pid_max: never exists


def test_parse_status_ids() -> None:
    text = "Name:\tqemu\nUid:\t3000000\t3000000\t3000000\t3000000\nGid:\t7\t7\t7\t7\nGroups:\t\n"
    assert parse_status_ids(text, "Uid") == (3000000,) * 4
    assert parse_status_ids(text, "Gid") == (7,) * 4
    assert parse_status_groups(text) == []
    with pytest.raises(ValueError):
        parse_status_ids("Name:\tx\n", "Uid")


def test_vm_name_from_argv() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=agentiso-ws1,process=agentiso-ws1"]
    assert vm_name_from_argv(argv) == "ws1"
    assert vm_name_from_argv(["/usr/bin/python3", "-name", "guest=agentiso-ws1"]) is None
    assert vm_name_from_argv(["qemu-system-x86_64", "-name", "guest=other"]) is None
    assert vm_name_from_argv(["qemu-system-x86_64", "-name"]) is None
    assert vm_name_from_argv([]) is None


def test_scan_finds_nothing_of_ours_in_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    p = tmp_path / "77"
    p.mkdir()
    (p / "cmdline").write_bytes(b"qemu-system-x86_64\0-name\0guest=agentiso-zz\0")
    (p / "stat").write_text(STAT.replace("4242 (", "77 ("))
    q = tmp_path / "78"
    q.mkdir()
    (q / "cmdline").write_bytes(b"bash\0")
    z = tmp_path / "79"
    z.mkdir()
    (z / "cmdline").write_bytes(b"qemu-system-x86_64\0-name\0guest=agentiso-dead\0")
    (z / "stat").write_text(STAT.replace("4242 (", "79 (").replace(") S ", ") Z "))
    assert scan_agentiso_qemus(tmp_path) == {77: "zz"}


CPUINFO = "processor\t: 0\ncpu MHz\t\t: 2596.106\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"


def test_parse_cpuinfo_tsc() -> None:
    assert parse_cpuinfo_tsc_khz(CPUINFO) == 2596106
    assert parse_cpuinfo_tsc_khz(CPUINFO.replace("constant_tsc ", "")) is None
    assert parse_cpuinfo_tsc_khz("flags: constant_tsc\n") is None
    assert parse_cpuinfo_tsc_khz("cpu MHz : fast\nflags: constant_tsc\n") is None
    assert parse_cpuinfo_tsc_khz("cpu MHz : -3\nflags: constant_tsc\n") is None


# --- records -------------------------------------------------------------------------


def make_record(name: str = "ws1", **kw: object) -> VmRecord:
    rec = VmRecord(
        name=name,
        pid=4242,
        pid_start_time=987654,
        uid=3000000,
        gid=3000000,
        run_dir=f"/run/a/{name}",
        qmp_socket=f"/run/a/{name}/qmp.sock",
        console_socket=f"/run/a/{name}/console.sock",
        channel_socket=f"/run/a/{name}/agent.sock",
        console_log=f"/var/lib/a/vm/logs/{name}/console.log",
        stderr_log=f"/var/lib/a/vm/logs/{name}/stderr.log",
        spec=make_spec(name=name),
        started_at=1.5,
    )
    return msgspec.structs.replace(rec, **kw)


def test_record_roundtrip() -> None:
    rec = make_record()
    assert decode_record(encode_record(rec)) == rec


def test_record_without_newer_fields_still_decodes() -> None:
    """Records written before live snapshots existed (no top_node) stay adoptable."""
    raw = msgspec.json.decode(encode_record(make_record()))
    del raw["top_node"], raw["overlay_generation"]
    rec = decode_record(msgspec.json.encode(raw))
    assert rec.top_node == "disk0" and rec.overlay_generation == 0


def test_record_rejects_bad_content() -> None:
    with pytest.raises(InvalidVmSpec):
        decode_record(encode_record(make_record(name="../etc", spec=make_spec())))
    with pytest.raises(ValueError):
        decode_record(encode_record(make_record(spec=make_spec(name="other"))))
    with pytest.raises(ValueError):
        decode_record(encode_record(make_record(version=99)))
    with pytest.raises(msgspec.DecodeError):
        decode_record(b"{not json")


def test_store_atomic_save_load_delete(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records")
    store.ensure()
    assert stat.S_IMODE((tmp_path / "records").stat().st_mode) == 0o700
    store.save(make_record("a"))
    store.save(make_record("b"))
    store.save(make_record("a", pid=5))  # replace
    (tmp_path / "records" / "junk.json").write_text("{")
    (tmp_path / "records" / "c.json").write_bytes(encode_record(make_record("d")))
    recs, bad = store.load_all()
    assert [(r.name, r.pid) for r in recs] == [("a", 5), ("b", 4242)]
    assert set(bad) == {"junk.json", "c.json"}
    assert not list((tmp_path / "records").glob(".*tmp"))
    assert stat.S_IMODE(store.path("a").stat().st_mode) == 0o600
    store.delete("a")
    store.delete("a")  # idempotent
    assert [r.name for r in store.load_all()[0]] == ["b"]
    with pytest.raises(InvalidVmSpec):
        store.path("../x")


def test_store_of_missing_dir_is_empty(tmp_path: Path) -> None:
    assert RecordStore(tmp_path / "nope").load_all() == ([], {})


# --- uids ----------------------------------------------------------------------------


def test_allocate_lowest_free() -> None:
    rng = UidRange(3000000, 4)
    assert allocate_uid(rng, []) == 3000000
    assert allocate_uid(rng, [3000000, 3000002]) == 3000001
    assert allocate_uid(rng, [3000000], usable=lambda u: u != 3000001) == 3000002
    assert 3000003 in rng and 3000004 not in rng and "x" not in rng


def test_allocate_exhausted() -> None:
    rng = UidRange(3000000, 2)
    with pytest.raises(VmLimitExceeded):
        allocate_uid(rng, [3000000, 3000001])


@pytest.mark.parametrize(("base", "count"), [(0, 10), (999, 10), (3000000, 0), (2**32 - 10, 100)])
def test_bad_uid_ranges(base: int, count: int) -> None:
    with pytest.raises(InvalidVmSpec):
        UidRange(base, count)


# --- bounded logs --------------------------------------------------------------------


def test_bounded_log_never_exceeds_cap(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = BoundedLog(path, 1000)
    for i in range(300):
        log.write(f"line {i:04d}\n".encode())
    log.write(b"x" * 5000)  # one huge write is split across rotations
    log.write(b"END\n")
    log.close()
    total = path.stat().st_size + (tmp_path / "console.log.1").stat().st_size
    assert total <= 1000
    assert tail(path, 4) == b"END\n"
    # at least half the cap is always kept: the rotated file is full
    assert 500 <= len(tail(path, 700)) <= 700


def test_bounded_log_resumes_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"a" * 400)
    log = BoundedLog(path, 1000)
    log.write(b"b" * 200)
    log.close()
    assert path.stat().st_size + (tmp_path / "c.log.1").stat().st_size <= 1000
    assert tail(path, 3) == b"bbb"


def test_bounded_log_rejects_tiny_cap(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BoundedLog(tmp_path / "x", 1)


def test_tail_of_missing_files(tmp_path: Path) -> None:
    assert tail(tmp_path / "none.log", 100) == b""


def test_cap_appended_file_keeps_tail_and_writer_continues(tmp_path: Path) -> None:
    path = tmp_path / "stderr.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # like QEMU's stderr
    try:
        os.write(fd, b"x" * 900 + b"LAST")
        assert not cap_appended_file(path, 10_000)
        assert cap_appended_file(path, 1000)
        assert path.stat().st_size == 0
        assert (tmp_path / "stderr.log.1").read_bytes().endswith(b"LAST")
        os.write(fd, b"after")
        assert path.read_bytes() == b"after"  # O_APPEND: no hole, no old offset
    finally:
        os.close(fd)
    assert not cap_appended_file(tmp_path / "missing", 10)


# --- accelerator probe (pure parts) --------------------------------------------------


def test_kvm_access() -> None:
    chr_mode = stat.S_IFCHR
    assert kvm_access(chr_mode | 0o666, 0)[:2] == (True, None)
    assert kvm_access(chr_mode | 0o660, 108)[:2] == (True, 108)
    ok, gid, why = kvm_access(chr_mode | 0o600, 0)
    assert not ok and gid is None and "only to root" in why
    assert not kvm_access(chr_mode | 0o660, 0)[0]  # group root: we never run QEMU with gid 0
    assert not kvm_access(stat.S_IFREG | 0o666, 0)[0]


def test_probe_argv_boots_without_root_disk() -> None:
    argv = probe_argv("qemu-system-x86_64", "/img/vmlinuz")
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert "-no-reboot" in argv and "-sandbox" in argv
    append = argv[argv.index("-append") + 1]
    assert "panic=-1" in append and "root=" in append


def test_probe_success_patterns() -> None:
    assert PROBE_SUCCESS.search(b"[ 0.5] Kernel panic - not syncing: VFS: Unable to mount root")
    assert not PROBE_SUCCESS.search(b"Probing EDD (edd=off to disable)... ok\r\n")


# --- engine helpers ----------------------------------------------------------------


def test_world_readable_path_problem(tmp_path: Path) -> None:
    from agentiso.privhelper.vm.engine import world_readable_path_problem

    base = tmp_path / "img"
    base.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(base, 0o755)
    k = base / "vmlinuz"
    k.write_bytes(b"k")
    os.chmod(k, 0o644)
    # pytest's own base directories may be private: only judge from tmp_path down
    parents_ok = all(p.stat().st_mode & stat.S_IXOTH for p in tmp_path.parents)
    if parents_ok:
        assert world_readable_path_problem(str(k)) is None
        assert world_readable_path_problem(str(base), directory=True) is None
    os.chmod(k, 0o600)
    assert "not readable" in (world_readable_path_problem(str(k)) or "")
    os.chmod(k, 0o644)
    os.chmod(base, 0o750)
    assert "not traversable" in (world_readable_path_problem(str(k)) or "")
    assert "not traversable" in (world_readable_path_problem(str(base), directory=True) or "")
    assert "No such file" in (world_readable_path_problem(str(base / "nope")) or "")
    os.chmod(base, 0o755)


def test_uid_unassigned() -> None:
    from agentiso.privhelper.vm.uids import uid_unassigned

    assert not uid_unassigned(0)  # root has an account
    assert uid_unassigned(3_999_999_999)


def test_uids_in_use_sees_a_live_process_of_the_range() -> None:
    from agentiso.privhelper.vm.procfs import uids_in_use

    me = os.geteuid()
    assert me in uids_in_use(me, me + 1)
    assert uids_in_use(3_999_999_000, 3_999_999_100) == set()
