"""``agentiso-helper check``: can this host run workspaces, and how.

Two halves, kept apart so the judging is testable without root or a host:

* :func:`judge` is pure: it takes :class:`HostFacts` (plain values gathered
  beforehand) and returns one :class:`Line` per prerequisite, each ``pass``,
  ``warn`` (works, with a fallback or a weaker guarantee, said in the line)
  or ``fail`` (workspaces cannot run, or run unsafely), every warn and fail
  with the fix.
* :func:`agentiso.privhelper.checks.host.gather` is the thin, read-only
  adapter that looks at the host: it
  runs ``qemu -machine help``, ``qemu-img --version``, ``nft list tables``,
  stats devices and the socket, reads the password database and
  ``/etc/subuid``, and boots the probe kernel under KVM (as the engine does).
  It never creates, changes or removes anything on the host.

The exit code of the command reflects fails only (:func:`exit_code`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["pass", "warn", "fail"]

#: Where the polkit policy is installed (``make install``).
POLKIT_POLICY = Path("/usr/share/polkit-1/actions/org.agentiso.helper.policy")


@dataclass(frozen=True)
class Line:
    """One prerequisite's verdict.  ``fix`` is set for every warn and fail."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class HostFacts:
    """Everything :func:`judge` looks at, gathered beforehand (plain values)."""

    config_source: str
    is_root: bool = True
    # QEMU
    qemu_binary: str = "qemu-system-x86_64"
    qemu_path: str | None = None
    #: Output of ``qemu -machine help`` (None: could not run it).
    qemu_machines: str | None = None
    #: The engine's unprivileged test run: (ok, detail); None when not run.
    unprivileged_qemu: tuple[bool, str] | None = None
    # Accelerator
    accel_mode: str = "auto"
    kvm_present: bool = False
    #: The engine's decision after its probe boot ("kvm" or "tcg") and why.
    accel_kind: str | None = None
    accel_reason: str = ""
    #: Set when deciding failed (e.g. KVM configured but unusable).
    accel_error: str | None = None
    vhost_vsock: bool = False
    # Storage
    storage_backend: str = "qcow2"
    #: (ok, detail) of the configured backend's tools.
    storage: tuple[bool, str] = (False, "not checked")
    # Network
    nft_path: str | None = None
    #: None: nft ran; else why it did not.
    nft_error: str | None = None
    tun_present: bool = False
    tun_rw: bool = False
    bridge: str = "br-agentiso"
    #: "absent", "bridge", another link kind, or "error: ..." (netlink unusable).
    bridge_kind: str = "absent"
    br_netfilter: str = "absent"
    # Images
    images_dir: str = ""
    images: tuple[str, ...] = ()
    #: Why an unprivileged QEMU could not read an image's kernel/initrd (None: it can).
    image_access_problem: str | None = None
    # VM uid range
    uid_base: int = 3_000_000
    uid_count: int = 4096
    #: Accounts whose uid lies in the range: (name, uid).
    accounts_in_range: tuple[tuple[str, int], ...] = ()
    #: /etc/subuid or /etc/subgid entries overlapping the range: (file, owner, start, count).
    subid_overlaps: tuple[tuple[str, str, int, int], ...] = ()
    #: The run dir's verdict from the engine's check: (ok, detail); None: absent.
    run_dir: tuple[bool, str] | None = None
    run_dir_path: str = "/run/agentiso/vm"
    # Socket
    socket_path: str = "/run/agentiso/helper.sock"
    socket_group: str = "agentiso"
    #: The configured group's gid (None: no such group), and its listed members.
    socket_gid: int | None = None
    group_members: tuple[str, ...] = ()
    socket_mode: int = 0o660
    #: (mode bits, owner uid, group gid, is a socket) of the socket file; None: absent.
    socket_stat: tuple[int, int, int, bool] | None = None
    #: Why the socket's directory cannot be traversed by others (None: it can).
    socket_dir_problem: str | None = None
    #: The helper's hello ("agentiso-helper 0.1, protocol 1, up 3 s"); None: no answer.
    helper_answer: str | None = None
    helper_error: str = ""
    # Authorization
    authorization: str = "group"
    pkcheck_path: str | None = None
    polkit_policy: bool = False
    #: polkit's answer to "may this (root) process use the admin class", asked
    #: only with authorization = "polkit": "allowed", "denied" or "unreachable".
    polkit_answer: str | None = None


# --- judging (pure) -------------------------------------------------------------------


def judge(f: HostFacts) -> list[Line]:
    """One line per prerequisite, in a fixed order."""
    return [
        Line("config", "pass", f.config_source),
        _qemu(f), _unprivileged_qemu(f), _kvm(f), _vsock(f), _storage(f), _nft(f),
        _tap(f), _bridge(f), _images(f), _uid_range(f), _run_dir(f), _group(f), _socket(f),
        _helper(f), _polkit(f),
    ]


def _qemu(f: HostFacts) -> Line:
    if f.qemu_path is None:
        return Line("qemu", "fail", f"{f.qemu_binary} not found on PATH",
                    "apt install qemu-system-x86 (or set [vm] qemu_binary)")
    if f.qemu_machines is None:
        return Line("qemu", "fail", f"{f.qemu_path} -machine help did not run",
                    "reinstall QEMU; run it by hand to see why")
    if not any(ln.split()[:1] == ["microvm"] for ln in f.qemu_machines.splitlines()):
        return Line("qemu", "fail", f"{f.qemu_path} has no microvm machine",
                    "install QEMU >= 4.2 built with microvm (Debian's qemu-system-x86)")
    return Line("qemu", "pass", f"{f.qemu_path}, microvm machine available")


def _unprivileged_qemu(f: HostFacts) -> Line:
    name = "unprivileged-qemu"
    if f.unprivileged_qemu is None:
        return Line(name, "fail", "not tested: no QEMU", "install QEMU first")
    ok, detail = f.unprivileged_qemu
    if not f.is_root:
        return Line(name, "warn", detail, "run the helper (and this check) as root")
    if not ok:
        return Line(name, "fail", detail,
                    "make QEMU and its libraries readable by every uid; check [vm] uid_base")
    return Line(name, "pass", detail)


def _kvm(f: HostFacts) -> Line:
    if f.accel_error is not None:
        return Line("kvm", "fail", f.accel_error,
                    'give the VM uids access to /dev/kvm, or set [vm] accel = "auto"')
    if f.accel_mode == "tcg":
        return Line("kvm", "pass", 'TCG as configured ([vm] accel = "tcg")')
    if f.accel_kind == "kvm":
        return Line("kvm", "pass", f"KVM usable by the VM uids ({f.accel_reason})")
    why = f.accel_reason or ("no /dev/kvm" if not f.kvm_present else "not probed (no image)")
    if not f.kvm_present:
        fix = "load kvm_intel/kvm_amd on a host with hardware virtualization, or keep TCG"
    else:
        fix = ("let the VM uids open /dev/kvm: a udev rule giving it mode 0660 and a "
               "non-root group (e.g. kvm), or mode 0666; or keep TCG")
    return Line("kvm", "warn", f"fallback: VMs run under TCG (slower): {why}", fix)


def _vsock(f: HostFacts) -> Line:
    if f.vhost_vsock:
        return Line("vhost-vsock", "pass", "/dev/vhost-vsock: guest channel over vsock")
    return Line("vhost-vsock", "warn",
                "fallback: no /dev/vhost-vsock, the guest channel is virtio-serial",
                "modprobe vhost_vsock (optional: virtio-serial works everywhere)")


def _storage(f: HostFacts) -> Line:
    ok, detail = f.storage
    name = f"storage-{f.storage_backend}"
    if ok:
        return Line(name, "pass", detail)
    fix = ("apt install qemu-utils" if f.storage_backend == "qcow2" else
           "install ZFS (zfsutils-linux), import the pool of [storage.zfs] dataset, "
           'or set [storage] backend = "qcow2"')
    return Line(name, "fail", detail, fix)


def _nft(f: HostFacts) -> Line:
    if f.nft_path is None:
        return Line("nft", "fail", "nft not found on PATH", "apt install nftables")
    if f.nft_error is not None:
        return Line("nft", "fail", f"nft does not work: {f.nft_error}",
                    "run as root on a kernel with nf_tables (modprobe nf_tables)")
    return Line("nft", "pass", f"{f.nft_path} works")


def _tap(f: HostFacts) -> Line:
    if not f.tun_present:
        return Line("tap", "fail", "/dev/net/tun is missing (no TAP devices)",
                    "modprobe tun")
    if not f.tun_rw:
        return Line("tap", "fail", "/dev/net/tun is not read-writable by the helper",
                    "run the helper as root")
    return Line("tap", "pass", "/dev/net/tun usable")


def _bridge(f: HostFacts) -> Line:
    nf = f"br_netfilter {f.br_netfilter} (isolation does not depend on it)"
    if f.bridge_kind.startswith("error"):
        return Line("bridge", "fail", f"netlink unusable: {f.bridge_kind[7:]}",
                    "run the helper as root (CAP_NET_ADMIN)")
    if f.bridge_kind == "absent":
        return Line("bridge", "pass", f"{f.bridge} will be created at start; {nf}")
    if f.bridge_kind != "bridge":
        return Line("bridge", "fail", f"{f.bridge} exists and is a {f.bridge_kind}, not a bridge",
                    "delete that link or set [net] bridge to another name")
    return Line("bridge", "pass", f"{f.bridge} is up as a bridge; {nf}")


def _images(f: HostFacts) -> Line:
    if not f.images:
        return Line("images", "fail", f"no complete image in {f.images_dir}",
                    "make image (then install it), or set [paths] images_dir")
    if f.image_access_problem is not None:
        return Line("images", "fail", f"VM uids cannot read an image: {f.image_access_problem}",
                    "chmod a+rX the images directory and its files")
    return Line("images", "pass", f"{', '.join(f.images)} in {f.images_dir}")


def _uid_range(f: HostFacts) -> Line:
    last = f.uid_base + f.uid_count - 1
    rng = f"{f.uid_base}..{last}"
    if f.uid_base < 1000 or f.uid_count < 1 or last >= 2**32 - 2:
        return Line("uid-range", "fail", f"VM uid range {rng} is not within [1000, 2^32-2)",
                    "set [vm] uid_base and uid_count to a range no account uses")
    if f.subid_overlaps:
        who = ", ".join(f"{o} ({fn} {s}+{c})" for fn, o, s, c in f.subid_overlaps)
        return Line("uid-range", "fail",
                    f"VM uid range {rng} overlaps subordinate ids of {who}: they could "
                    "become a VM's uid in a user namespace",
                    "move [vm] uid_base past every /etc/subuid and /etc/subgid range")
    if f.accounts_in_range:
        who = ", ".join(f"{n} ({u})" for n, u in f.accounts_in_range[:5])
        return Line("uid-range", "warn",
                    f"accounts inside VM uid range {rng} are skipped: {who}",
                    "move [vm] uid_base to a range no account uses")
    return Line("uid-range", "pass", f"{rng}: no account or subordinate id uses it")


def _run_dir(f: HostFacts) -> Line:
    if f.run_dir is None:
        return Line("run-dir", "pass", f"{f.run_dir_path} will be created at start")
    ok, detail = f.run_dir
    if ok:
        return Line("run-dir", "pass", detail)
    return Line("run-dir", "fail", detail,
                f"chown root {f.run_dir_path} && chmod go-w {f.run_dir_path}")


def _group(f: HostFacts) -> Line:
    if f.socket_gid is None:
        return Line("group", "fail",
                    f"group {f.socket_group!r} does not exist: only root can use the helper",
                    "systemd-sysusers (agentiso.sysusers.conf) or groupadd --system agentiso; "
                    "then usermod -aG agentiso USER")
    members = f.group_members
    return Line("group", "pass", f"group {f.socket_group} (gid {f.socket_gid}) may connect"
                + (f": {', '.join(members)}" if members else "; it has no members yet"))


def _socket(f: HostFacts) -> Line:
    path = f.socket_path
    if f.socket_stat is None:
        return Line("socket", "warn", f"{path} does not exist: the helper is not listening",
                    "systemctl enable --now agentiso-helper.socket")
    mode, _uid, gid, is_sock = f.socket_stat
    if not is_sock:
        return Line("socket", "fail", f"{path} exists and is not a socket",
                    "remove it and restart agentiso-helper.socket")
    if f.socket_dir_problem is not None:
        return Line("socket", "fail", f.socket_dir_problem,
                    f"chmod a+x {Path(path).parent}")
    want = f.socket_mode
    if f.socket_gid is not None and gid != f.socket_gid and mode & 0o060 and not mode & 0o006:
        return Line("socket", "fail",
                    f"{path} belongs to gid {gid}, not {f.socket_group}: members cannot connect",
                    f"chgrp {f.socket_group} {path} (SocketGroup= in the .socket unit)")
    if mode & 0o006 and not want & 0o006:
        return Line("socket", "warn",
                    f"{path} is mode {mode:04o}: any uid may connect (the helper still "
                    "checks each peer's uid and groups)",
                    f"chmod {want:04o} {path} (SocketMode= in the .socket unit)")
    if mode & want != want:
        return Line("socket", "fail", f"{path} is mode {mode:04o}, {want:04o} wanted",
                    f"chmod {want:04o} {path} (SocketMode= in the .socket unit)")
    return Line("socket", "pass", f"{path} mode {mode:04o} group {gid}")


def _helper(f: HostFacts) -> Line:
    if f.helper_answer is not None:
        return Line("helper", "pass", f.helper_answer)
    return Line("helper", "warn", f"no answer on {f.socket_path}: {f.helper_error}",
                "systemctl start agentiso-helper.socket (socket activation starts the rest)")


def _polkit(f: HostFacts) -> Line:
    if f.authorization != "polkit":
        extra = " (pkcheck installed)" if f.pkcheck_path else ""
        return Line("polkit", "pass",
                    f'authorization = "{f.authorization}": membership of {f.socket_group} '
                    f"decides, polkit is not asked{extra}")
    if f.pkcheck_path is None:
        return Line("polkit", "fail", 'authorization = "polkit" but pkcheck is not installed: '
                    "every request is refused", "apt install polkitd pkexec")
    if not f.polkit_policy:
        return Line("polkit", "fail", f"{POLKIT_POLICY} is missing: polkit knows no agentiso "
                    "actions and refuses them", "make install (installs the policy and rules)")
    if f.polkit_answer == "unreachable":
        return Line("polkit", "fail", "polkit cannot be asked (no D-Bus system bus or no "
                    "polkitd): every request is refused",
                    "start dbus and polkitd (systemctl start polkit), or set "
                    '[server] authorization = "group"')
    if f.polkit_answer == "denied":
        return Line("polkit", "warn", "polkit refuses root the admin class: the agentiso "
                    "rules file is not installed (the helper still lets root in)",
                    "make install (puts down the rules file), or add rules granting the "
                    "agentiso group the user classes")
    return Line("polkit", "pass", f"polkit decides and answers ({f.pkcheck_path}, "
                f"{POLKIT_POLICY.name})")


def render(lines: list[Line]) -> str:
    """The report: one line per check, and an indented fix under each warn/fail."""
    out = []
    for ln in lines:
        out.append(f"{ln.status.upper():<4}  {ln.name:<18} {ln.detail}")
        if ln.fix and ln.status != "pass":
            out.append(f"{'':<24} fix: {ln.fix}")
    fails = sum(ln.status == "fail" for ln in lines)
    warns = sum(ln.status == "warn" for ln in lines)
    out.append(f"{len(lines)} checks: {len(lines) - fails - warns} pass, {warns} warn, "
               f"{fails} fail")
    return "\n".join(out)


def exit_code(lines: list[Line]) -> int:
    """1 if anything failed, else 0: warnings do not fail the check."""
    return 1 if any(ln.status == "fail" for ln in lines) else 0


# --- pure helpers over host data -------------------------------------------------------


def accounts_in_range(entries: list[tuple[str, int]], base: int, count: int
                      ) -> tuple[tuple[str, int], ...]:
    """Accounts (name, uid) whose uid is in ``base .. base+count-1``."""
    return tuple((n, u) for n, u in entries if base <= u < base + count)


def subid_overlaps(text: str, file: str, base: int, count: int
                   ) -> tuple[tuple[str, str, int, int], ...]:
    """Entries of an ``/etc/subuid``-style text (``owner:start:count``) that
    overlap ``base .. base+count-1``; malformed lines are ignored."""
    out = []
    for raw in text.splitlines():
        parts = raw.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        start, n = int(parts[1]), int(parts[2])
        if start < base + count and base < start + n:
            out.append((file, parts[0], start, n))
    return tuple(out)
