"""What this host can do for VMs: the accelerator decision and the facts
``agentiso-helper check`` prints (QEMU, unprivileged QEMU, run dir, vsock)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import anyio

from .. import accel as accel_mod
from ..errors import VmError, VmUnavailable
from ..launch import QEMU_ENV
from ..uids import UidRange
from .kvmacl import KvmAcl
from .types import CheckResult, EngineSettings


def kvm_plan(
    st_mode: int, st_gid: int, *, acl_supported: bool, root: bool
) -> tuple[bool, int | None, bool, str]:
    """How an unprivileged QEMU gets at a /dev/kvm with this mode and group:
    (usable, gid to run QEMU with or None, per-uid ACL entry?, why).  A
    device open to a group is granted per VM uid instead, where the node
    keeps ACLs and we are root: no group shared by every VM (kvmacl.py)."""
    usable, gid, why = accel_mod.kvm_access(st_mode, st_gid)
    if usable and gid is not None and acl_supported and root:
        return True, None, True, f"{why.split(';')[0]}; each VM uid gets its own ACL entry instead"
    return usable, gid, False, why


async def decide_accelerator(
    settings: EngineSettings, uids: UidRange, kernel: str, acl: KvmAcl | None = None
) -> accel_mod.AccelDecision:
    """KVM only if a test boot of ``kernel`` under KVM, as an unprivileged uid,
    gets through kernel start-up; else TCG (or VmUnavailable if KVM is required).

    ``acl`` (default: /dev/kvm's) learns in ``per_uid`` whether VMs get a
    per-uid ACL entry rather than the device's group (see :func:`kvm_plan`)."""
    mode = settings.accel
    if mode == "tcg":
        return accel_mod.AccelDecision("tcg", "configured")
    acl = acl if acl is not None else KvmAcl()
    try:
        st = os.stat(acl.path)
    except OSError:
        return _kvm_unusable(mode, "no /dev/kvm")
    root = os.geteuid() == 0
    usable, gid, per_uid, why = kvm_plan(
        st.st_mode, st.st_gid, acl_supported=acl.supported(), root=root
    )
    if not usable:
        return _kvm_unusable(mode, why)
    uid = uids.base + uids.count - 1  # the probe's uid: the range's last
    if not root:
        uid = os.geteuid()
    if per_uid:
        acl.grant(uid)
    try:
        ok, detail = await accel_mod.kvm_boot_test(
            settings.qemu_binary,
            kernel,
            uid,
            gid if gid is not None else (uid if root else os.getegid()),
            settings.probe_timeout_s,
        )
    finally:
        if per_uid:
            acl.revoke(uid)
    if ok:
        acl.per_uid = per_uid
        return accel_mod.AccelDecision("kvm", f"{detail} ({why})" if per_uid else detail, gid)
    return _kvm_unusable(mode, detail)


def _kvm_unusable(mode: str, why: str) -> accel_mod.AccelDecision:
    if mode == "kvm":
        raise VmUnavailable(f"KVM is configured but unusable: {why}")
    return accel_mod.AccelDecision("tcg", why)


async def host_checks(
    settings: EngineSettings,
    uids: UidRange,
    run_dir: Path,
    accelerator: accel_mod.AccelDecision | VmError | None,
) -> list[CheckResult]:
    """Facts for ``agentiso-helper check`` (``accelerator``: the decision, the
    error deciding it, or None when there was no kernel to probe with)."""
    results: list[CheckResult] = []
    qemu = shutil.which(settings.qemu_binary)
    results.append(
        CheckResult("qemu", qemu is not None, qemu or f"{settings.qemu_binary} not found")
    )
    if qemu is not None:
        uid = uids.base + uids.count - 1
        results.append(await anyio.to_thread.run_sync(unprivileged_qemu_check, qemu, uid, uids))
    results.append(private_dir_check("run-dir", run_dir))
    results.append(vsock_check())
    if isinstance(accelerator, VmError):
        results.append(CheckResult("accelerator", False, accelerator.message))
    elif accelerator is not None:
        results.append(
            CheckResult("accelerator", True, f"{accelerator.kind}: {accelerator.reason}")
        )
    return results


def unprivileged_qemu_check(qemu: str, uid: int, rng: UidRange) -> CheckResult:
    """Run ``qemu -version`` exactly as VMs are run: as a range uid, no groups."""
    name = "unprivileged-qemu"
    if os.geteuid() != 0:
        return CheckResult(
            name,
            True,
            f"helper is not root: QEMU runs as the helper's uid {os.geteuid()} "
            "(no per-VM uid isolation)",
        )
    try:
        out = subprocess.run(
            [qemu, "-version"],
            capture_output=True,
            timeout=30,
            user=uid,
            group=uid,
            extra_groups=[],
            env=QEMU_ENV,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return CheckResult(
            name, False, f"cannot run QEMU as uid {uid} ({e}); VMs will not start (never as root)"
        )
    if out.returncode != 0:
        return CheckResult(name, False, f"QEMU as uid {uid} failed: {out.stderr[:200]!r}")
    return CheckResult(
        name,
        True,
        f"each QEMU runs as its own uid from {rng.base}+{rng.count}, "
        "no supplementary groups, full -sandbox",
    )


def private_dir_check(name: str, path: Path) -> CheckResult:
    """The helper's own directory: owned by it and not writable by anyone else."""
    try:
        st = path.stat()
    except OSError as e:
        return CheckResult(name, False, f"{path}: {e.strerror}")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return CheckResult(name, False, f"{path} is not private to the helper")
    return CheckResult(name, True, f"{path} (private; QEMU gets its sockets as fds)")


def vsock_check() -> CheckResult:
    if os.path.exists("/dev/vhost-vsock"):
        return CheckResult("vhost-vsock", True, "vsock guest channel available")
    return CheckResult("vhost-vsock", True, "no /dev/vhost-vsock: guest channel is virtio-serial")


def world_readable_path_problem(path: str, *, directory: bool = False) -> str | None:
    """Why a uid with no groups could not read ``path`` (or enter it, for a directory)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        return f"{path}: {e.strerror}"
    need = stat.S_IXOTH if directory else stat.S_IROTH
    if not st.st_mode & need:
        return f"{path} is not {'traversable' if directory else 'readable'} by other uids"
    for parent in p.parents:
        try:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return f"directory {parent} is not traversable by other uids"
        except OSError as e:
            return f"{parent}: {e.strerror}"
    return None
