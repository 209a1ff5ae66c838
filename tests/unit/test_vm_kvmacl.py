"""Per-uid /dev/kvm access (privhelper/vm/engine/kvmacl.py): the ACL arithmetic,
the plan that replaces a shared kvm group, and the adapter against a real file
with POSIX ACLs (a tmpfs file standing in for the device node: this host's
/dev/kvm is root-only and not usable, so the engine never touches it here)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.privhelper.vm.engine.hostcheck import kvm_plan
from agentiso.privhelper.vm.engine.kvmacl import (
    GROUP,
    GROUP_OBJ,
    MASK,
    OTHER,
    UNDEFINED_ID,
    USER,
    USER_OBJ,
    KvmAcl,
    acl_from_mode,
    decode_acl,
    encode_acl,
    named_users,
    with_user,
    without_user,
)

U = UNDEFINED_ID
KVM_GROUP = 108


def effective(entries: list[tuple[int, int, int]], tag: int, ident: int = U) -> int:
    mask = next((p for t, p, _ in entries if t == MASK), 7)
    perm = next(p for t, p, i in entries if t == tag and i == ident)
    return perm & mask if tag in (USER, GROUP, GROUP_OBJ) else perm


def test_codec_round_trips_and_refuses_garbage() -> None:
    acl = [(USER_OBJ, 6, U), (USER, 6, 3_000_001), (GROUP_OBJ, 6, U), (MASK, 6, U), (OTHER, 0, U)]
    assert decode_acl(encode_acl(reversed(acl))) == acl  # sorted as the kernel wants
    for bad in (b"", b"\x02\x00\x00\x00\x01", b"\x01\x00\x00\x00"):
        with pytest.raises(ValueError):
            decode_acl(bad)


def test_grant_and_revoke_leave_everyone_else_as_they_were() -> None:
    base = acl_from_mode(0o660)  # root:kvm 0660, no ACL yet
    a = with_user(base, 3_000_001)
    assert effective(a, USER, 3_000_001) == 6
    assert effective(a, GROUP_OBJ) == 6 and effective(a, OTHER) == 0
    b = with_user(a, 3_000_002)
    assert named_users(b) == {3_000_001, 3_000_002}
    assert without_user(without_user(b, 3_000_001), 3_000_002) == base  # back to the mode
    # An existing narrower mask is never widened for the others.
    narrow = [(USER_OBJ, 6, U), (USER, 6, 42), (GROUP_OBJ, 6, U), (MASK, 4, U), (OTHER, 0, U)]
    c = with_user(narrow, 3_000_001)
    assert effective(c, USER, 42) == 4 and effective(c, GROUP_OBJ) == 4
    assert effective(c, USER, 3_000_001) == 6
    assert effective(without_user(c, 3_000_001), USER, 42) == 4
    # Granting twice keeps one entry.
    assert sum(1 for t, _, i in with_user(a, 3_000_001) if t == USER and i == 3_000_001) == 1


@pytest.mark.parametrize(
    ("mode", "gid", "acl", "root", "expect"),
    [
        (0o660, KVM_GROUP, True, True, (True, None, True)),  # per uid: no shared group
        (0o660, KVM_GROUP, False, True, (True, KVM_GROUP, False)),  # no ACLs: the group
        (0o660, KVM_GROUP, True, False, (True, KVM_GROUP, False)),  # not root: cannot grant
        (0o666, 0, True, True, (True, None, False)),  # open to all: nothing to grant
        (0o600, 0, True, True, (False, None, False)),  # root-only (this host): TCG
    ],
)
def test_plan(mode: int, gid: int, acl: bool, root: bool,
              expect: tuple[bool, int | None, bool]) -> None:
    usable, run_gid, per_uid, why = kvm_plan(stat.S_IFCHR | mode, gid, acl_supported=acl,
                                             root=root)
    assert (usable, run_gid, per_uid) == expect, why


@pytest.fixture
def node() -> Iterator[KvmAcl]:
    """A 0660 file on tmpfs (ACLs supported where CONFIG_TMPFS_POSIX_ACL is set)."""
    path = Path("/dev/shm") / f"agentiso-kvmacl-{os.getpid()}"
    path.touch(mode=0o660)
    os.chmod(path, 0o660)
    acl = KvmAcl(str(path))
    try:
        if not acl.supported():
            pytest.skip(reason="/dev/shm keeps no POSIX ACLs here")
        yield acl
    finally:
        path.unlink()


def test_adapter_grants_revokes_and_collects_stale_entries(node: KvmAcl) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="the other uid's open needs a root test run")
    node.grant(3_000_001)
    node.grant(3_000_002)
    node.grant(1234)  # not a VM uid: gc leaves it alone
    assert named_users(node.entries()) == {3_000_001, 3_000_002, 1234}
    assert stat.S_IMODE(os.stat(node.path).st_mode) == 0o660  # mask rw: the group as before
    node.revoke(3_000_001)
    assert named_users(node.entries()) == {3_000_002, 1234}
    assert node.revoke_stale(range(3_000_000, 3_004_096), keep=set()) == [3_000_002]
    node.revoke(1234)
    assert named_users(node.entries()) == set()
    assert stat.S_IMODE(os.stat(node.path).st_mode) == 0o660
    node.revoke(1234)  # nothing to do


def test_the_granted_uid_can_open_and_others_cannot(node: KvmAcl) -> None:
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip(reason="switching uids needs a root test run")
    py = getattr(sys, "_base_executable", sys.executable)
    code = f"open({node.path!r}, 'r+b').close()"

    def opens(uid: int) -> bool:
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            py, "-c", code], capture_output=True, timeout=30, cwd="/")
        return r.returncode == 0

    assert not opens(3_000_001)
    node.grant(3_000_001)
    assert opens(3_000_001) and not opens(3_000_002)
    node.revoke(3_000_001)
    assert not opens(3_000_001)
