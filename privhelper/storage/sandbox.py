"""Run a root ``qemu-img`` that can open only the files it was given (Landlock).

A guest's QEMU may have rewritten the header of a layer root's ``qemu-img``
opens (see :mod:`.qcow2_header`): the header check and the pinned chain keep
qemu-img to the recorded files, except for an external data file set between
the check and the command, for which qemu-img has no override.  This closes
that too: the command runs under a Landlock ruleset (Linux >= 5.13, enforced
for root as for anyone) that allows reading and writing exactly the listed
image files, reading the program's libraries, and nothing else; any other
open fails with EACCES inside qemu-img, whatever a header says.

This file is a standalone script (stdlib only, run as ``python -I -S
<this file> --ro P --rw P -- argv``) so its start costs ~20 ms and imports
nothing of the helper.  :func:`wrap` builds that argv (pure) and
:func:`available` probes the kernel once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
#: Every filesystem right of each Landlock ABI version: all are handled (so
#: denied unless a rule grants them).
_HANDLED = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_HANDLED_LATEST = (1 << 16) - 1  # ABI 5 and later: IOCTL_DEV too
#: Rights that apply to a file (a rule on a file may grant only these).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

#: What the program itself needs (qemu-img 7.2, strace'd): its binary and
#: libraries, the loader cache, /dev/null, /dev/urandom, and CPU/NUMA facts.
#: Read-only; nothing here is a user's data.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ld.so.cache",
               "/dev/urandom", "/sys/devices/system/cpu", "/sys/devices/system/node")
SYSTEM_RW = ("/dev/null",)


def wrap(argv: Sequence[str], *, ro: Sequence[Path], rw: Sequence[Path]) -> list[str]:
    """The argv that runs ``argv`` confined to ``ro`` (read) and ``rw`` (read, write)."""
    out = [sys.executable, "-I", "-S", str(Path(__file__).resolve())]
    for p in ro:
        out += ["--ro", str(p)]
    for p in rw:
        out += ["--rw", str(p)]
    return [*out, "--", *argv]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    try:
        v = int(_libc().syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(v, 0)


def available() -> bool:
    return abi_version() >= 1


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"landlock {what}: {os.strerror(err)}")


def confine(ro: Sequence[str], rw: Sequence[str]) -> None:
    """Restrict this process (and what it execs) to the given paths."""
    libc = _libc()
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available")
    handled = _HANDLED.get(abi, _HANDLED_LATEST)
    attr = ctypes.c_uint64(handled)
    fd = int(libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0))
    if fd < 0:
        _fail("create_ruleset")
    try:
        rules = [(p, READ_FILE | READ_DIR | EXECUTE) for p in SYSTEM_READ]
        rules += [(p, READ_FILE | WRITE_FILE) for p in SYSTEM_RW]
        rules += [(p, READ_FILE) for p in ro]
        rules += [(p, READ_FILE | WRITE_FILE | TRUNCATE) for p in rw]
        for path, access in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                if path in SYSTEM_READ or path in SYSTEM_RW:
                    continue  # e.g. no /lib64 on this host
                raise
            try:
                if not os.path.isdir(path):
                    access &= _FILE_RIGHTS
                access &= handled
                rule = _PathBeneath(access, pfd)
                if libc.syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                    _fail(f"add_rule {path}")
            finally:
                os.close(pfd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            _fail("no_new_privs")
        if libc.syscall(_SYS_RESTRICT_SELF, fd, 0):
            _fail("restrict_self")
    finally:
        os.close(fd)


def main(args: list[str]) -> int:
    ro: list[str] = []
    rw: list[str] = []
    while args and args[0] != "--":
        if len(args) < 2 or args[0] not in ("--ro", "--rw"):
            print(f"agentiso sandbox: bad arguments {args[:2]}", file=sys.stderr)
            return 2
        flag, path, args = args[0], args[1], args[2:]
        (ro if flag == "--ro" else rw).append(path)
    argv = args[1:]
    if not argv:
        print("usage: sandbox.py [--ro P|--rw P]... -- argv", file=sys.stderr)
        return 2
    try:
        confine(ro, rw)
        os.execvp(argv[0], argv)
    except OSError as exc:
        # Fail closed: never run the command unconfined.
        print(f"agentiso sandbox: {exc}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
