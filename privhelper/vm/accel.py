"""Deciding between KVM and TCG: KVM only when a real test boot proves it works.

``/dev/kvm`` existing is not enough.  On the development machines it is backed
by a PVM-style module: QEMU opens it, the real-mode setup code runs ("Probing
EDD ... ok") and then a stock kernel never prints a line.  So the probe boots
the guest kernel under KVM with no root disk and ``panic=-1 -no-reboot``: a
working KVM reaches "Kernel panic - not syncing: VFS: Unable to mount root"
and QEMU exits in well under a second; anything else within the timeout means
TCG.  The probe QEMU runs unprivileged like every VM, so a ``/dev/kvm`` that
such a uid cannot open also means TCG (said in the decision's reason).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass
from typing import Literal

import anyio

from .cmdline import SANDBOX
from .launch import QEMU_ENV, check_identity

#: Lines that prove the kernel ran to the end of its boot under KVM.
PROBE_SUCCESS = re.compile(rb"Kernel panic|VFS: Unable to mount root|Run /\S+ as init")
PROBE_OUTPUT_CAP = 256 * 1024


@dataclass(frozen=True)
class AccelDecision:
    kind: Literal["kvm", "tcg"]
    reason: str
    #: Primary gid QEMU must run with to open /dev/kvm (None: its own gid will do).
    kvm_gid: int | None = None


def kvm_access(st_mode: int, st_gid: int) -> tuple[bool, int | None, str]:
    """Can an unprivileged, group-less QEMU open a /dev/kvm with this mode/gid?

    Returns (usable, gid to run QEMU with or None, explanation).
    """
    if not stat.S_ISCHR(st_mode):
        return False, None, "/dev/kvm is not a character device"
    rw_other = stat.S_IROTH | stat.S_IWOTH
    rw_group = stat.S_IRGRP | stat.S_IWGRP
    if st_mode & rw_other == rw_other:
        return True, None, "/dev/kvm is open to every uid"
    if st_mode & rw_group == rw_group and st_gid != 0:
        return True, st_gid, f"/dev/kvm is open to group {st_gid}; QEMU runs with that gid"
    return False, None, "/dev/kvm is accessible only to root; an unprivileged QEMU cannot use it"


def probe_argv(
    qemu_binary: str, kernel: str, accel: Literal["kvm", "tcg"] = "kvm", tsc_khz: int | None = None
) -> list[str]:
    """The test boot: no disk, the kernel panics at the end of start-up, QEMU exits.

    ``accel="tcg"`` runs the same boot under TCG (``tsc_khz`` as for VMs): the
    engine never probes TCG, but it lets the boot test itself be exercised on
    hosts where KVM is unusable.
    """
    if accel == "kvm":
        machine, cpu, append = "microvm,acpi=on,isa-serial=on,rtc=on,pit=off,pic=off", "host", ""
    else:
        machine, cpu = "microvm,acpi=on,isa-serial=on,rtc=on", "max"
        append = f" tsc_early_khz={tsc_khz}" if tsc_khz else ""
    return [
        qemu_binary,
        "-M", machine,
        "-accel", accel, "-cpu", cpu, "-m", "128M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic",
        "-sandbox", SANDBOX,
        "-kernel", kernel,
        "-append", "console=ttyS0 panic=-1 root=/dev/agentiso-probe-none" + append,
        "-serial", "stdio", "-no-reboot",
    ]  # fmt: skip


async def kvm_boot_test(
    qemu_binary: str,
    kernel: str,
    uid: int,
    gid: int,
    timeout: float,
    accel: Literal["kvm", "tcg"] = "kvm",
    tsc_khz: int | None = None,
) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM as ``uid:gid``; (True, why) if it reaches the end of boot.

    On a timeout QEMU is killed and the last console line is in the reason.
    """
    check_identity(uid, gid)
    switch = os.geteuid() == 0
    out = bytearray()
    ok = False
    async with await anyio.open_process(
        probe_argv(qemu_binary, kernel, accel, tsc_khz),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=QEMU_ENV,
        start_new_session=True,
        user=uid if switch else None,
        group=gid if switch else None,
        extra_groups=[] if switch else None,
    ) as proc:
        assert proc.stdout is not None
        try:
            with anyio.move_on_after(timeout):
                async for chunk in proc.stdout:
                    if len(out) < PROBE_OUTPUT_CAP:
                        out += chunk
                    if PROBE_SUCCESS.search(out):
                        ok = True
                        break
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
    name = accel.upper()
    if ok:
        return True, f"a test boot under {name} reached the end of kernel start-up"
    text = out.decode(errors="replace").strip().splitlines()
    last = text[-1][:200] if text else "no output"
    return False, f"a test boot under {name} did not complete within {timeout:g}s (last: {last})"
