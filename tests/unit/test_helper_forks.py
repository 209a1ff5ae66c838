"""The checks of ``VmStart(resume_from=...)`` (pure: privhelper/vms/forks.py)
and the secret a resumed VM's agent demands (privhelper/vsock.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentiso.privhelper import vsock
from agentiso.privhelper.errors import RequestFailed
from agentiso.privhelper.net.manager import Attachment
from agentiso.privhelper.registry import Registry, SnapshotRecord
from agentiso.privhelper.vms.forks import clone_mark, fork_source, reidentify_request
from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

OWNER = 1000
SRC = hp.FromSnapshot(volume="src", snapshot="s1")


def _registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry.json")
    src = reg.add_volume(OWNER, "src", "image:minimal", 2**30, "minimal")
    src.snapshots.append(SnapshotRecord(
        name="s1", created=1.0, memory_file=f"{src.key}-s1.mem", address="10.42.0.2",
        vcpus=1, memory_mib=256, secret="ab" * 32,
    ))
    src.snapshots.append(SnapshotRecord(name="disk-only", created=2.0))
    clone = reg.add_volume(OWNER, "clone", "snapshot:src@s1", 2**30, "minimal")
    clone.pristine_clone_of = clone_mark(src.key, "s1")
    reg.add_volume(OWNER, "plain", "image:minimal", 2**30, "minimal")
    reg.add_volume(OWNER + 1, "src", "image:minimal", 2**30, "minimal")
    return reg


def _start(volume: str = "clone", **kw: object) -> hp.VmStart:
    return hp.VmStart(id=1, name="fork-1", volume=volume, resume_from=SRC, **kw)  # type: ignore[arg-type]


def _refused(reg: Registry, req: hp.VmStart, owner: int = OWNER) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        fork_source(reg, owner, reg.volume(owner, req.volume), req)
    return info.value


def test_a_pristine_clone_of_the_snapshot_resumes_its_memory(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    src = reg.volume(OWNER, "src")
    fork = fork_source(reg, OWNER, reg.volume(OWNER, "clone"), _start())
    assert fork.memory_file == f"{src.key}-s1.mem"
    assert fork.old_mac == "02:a6:0a:2a:00:02"  # derived from the saved address
    assert fork.secret == "ab" * 32


def test_resume_from_refusals_say_why(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    cases: list[tuple[hp.VmStart, ErrorCode, str]] = [
        (_start("plain"), ErrorCode.CONFLICT, "not an unused clone"),
        (_start(memory_mib=512), ErrorCode.CONFLICT, "256 MiB"),
        (_start(vcpus=2), ErrorCode.CONFLICT, "1 vCPUs"),
        (_start(network=None), ErrorCode.CONFLICT, "network"),
        (_start(resume_snapshot="s1"), ErrorCode.INVALID, "not both"),
        (hp.VmStart(id=1, name="f", volume="clone",
                    resume_from=hp.FromSnapshot(volume="src", snapshot="disk-only")),
         ErrorCode.CONFLICT, "no saved memory"),
        (hp.VmStart(id=1, name="f", volume="clone",
                    resume_from=hp.FromSnapshot(volume="src", snapshot="nope")),
         ErrorCode.NOT_FOUND, "nope"),
        (hp.VmStart(id=1, name="f", volume="clone",
                    resume_from=hp.FromSnapshot(volume="gone", snapshot="s1")),
         ErrorCode.NOT_FOUND, "gone"),
    ]
    for req, code, words in cases:
        err = _refused(reg, req)
        assert err.code == code and words in err.message, (req, err.message)


def test_a_clone_that_has_run_or_of_another_snapshot_is_refused(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    clone = reg.volume(OWNER, "clone")
    clone.pristine_clone_of = None  # a VM ran on it
    assert _refused(reg, _start()).code == ErrorCode.CONFLICT
    clone.pristine_clone_of = clone_mark(reg.volume(OWNER, "src").key, "disk-only")
    assert _refused(reg, _start()).code == ErrorCode.CONFLICT
    # Another uid's volume of the same name is never the source.
    other = reg.volume(OWNER + 1, "src")
    clone.pristine_clone_of = clone_mark(other.key, "s1")
    assert _refused(reg, _start()).code == ErrorCode.CONFLICT


def test_the_reidentify_request_is_fresh_each_time() -> None:
    att = Attachment(workspace="m1", tap_fd=-1, tap_name="ai-0a2a0009", mac="02:a6:0a:2a:00:09",
                     address="10.42.0.9", gateway="10.42.0.1", prefix=16, dns=("10.42.0.1",))
    a = reidentify_request("fork-1", att, "02:a6:0a:2a:00:02")
    b = reidentify_request("fork-1", att, "02:a6:0a:2a:00:02")
    assert (a.mac, a.address, a.prefix, a.gateway, a.dns, a.hostname, a.old_mac) == (
        att.mac, "10.42.0.9", 16, "10.42.0.1", ["10.42.0.1"], "fork-1", "02:a6:0a:2a:00:02")
    assert a.machine_id != b.machine_id and a.entropy != b.entropy
    # It passes the wire's own bounds.
    assert gp.request_codec.decode(gp.request_codec.encode(a)) == a


def test_a_resumed_agent_keeps_the_secret_it_read_at_boot() -> None:
    assert vsock.secret_for("cd" * 32) == b"\xcd" * 32
    fresh = {vsock.secret_for(None) for _ in range(3)}
    assert len(fresh) == 3 and all(len(s) == vsock.SECRET_BYTES for s in fresh)
