"""``agentiso-helper check``: can this host run workspaces, and how.

Two halves, kept apart so the judging is testable without root or a host:

* :func:`judge` is pure: it takes :class:`HostFacts` (plain values gathered
  beforehand) and returns one :class:`Line` per prerequisite, each ``pass``,
  ``warn`` (works, with a fallback or a weaker guarantee, said in the line)
  or ``fail`` (workspaces cannot run, or run unsafely), every warn and fail
  with the fix.
* :func:`gather` is the thin, read-only adapter that looks at the host: it
  runs ``qemu -machine help``, ``qemu-img --version``, ``nft list tables``,
  stats devices and the socket, reads the password database and
  ``/etc/subuid``, and boots the probe kernel under KVM (as the engine does).
  It never creates, changes or removes anything on the host.

The exit code of the command reflects fails only (:func:`exit_code`).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import WireError

from .config import HelperConfig, resolve_gid
from .images import Image
from .net.tap import TUN_DEVICE
from .vm import accel as accel_mod
from .vm.engine.types import EngineSettings
from .vm.errors import VmError
from .vm.uids import UidRange

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
    #: The configured group's gid (None: no such group).
    socket_gid: int | None = None
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
    members = _members(f.socket_gid)
    return Line("group", "pass", f"group {f.socket_group} (gid {f.socket_gid}) may connect"
                + (f": {', '.join(members)}" if members else "; it has no members yet"))


def _members(gid: int) -> list[str]:
    try:
        return sorted(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []


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


# --- gathering (read-only I/O) ---------------------------------------------------------


def run_quiet(argv: list[str], timeout: float = 20.0) -> tuple[int, str]:
    """(exit status, stdout+stderr) of a command; (-1, why) if it could not run."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, str(exc)
    return r.returncode, (r.stdout + r.stderr).strip()


def socket_facts(path: str) -> tuple[tuple[int, int, int, bool] | None, str | None]:
    """The socket's (mode, uid, gid, is-socket) and any problem reaching its directory."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    problem = None
    for parent in Path(path).parents:
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                problem = f"directory {parent} is not traversable by group members"
                break
        except OSError as exc:
            problem = f"{parent}: {exc.strerror}"
            break
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, stat.S_ISSOCK(st.st_mode)), problem


def read_subids(base: int, count: int) -> tuple[tuple[str, str, int, int], ...]:
    out: tuple[tuple[str, str, int, int], ...] = ()
    for name in ("/etc/subuid", "/etc/subgid"):
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        out += subid_overlaps(text, name, base, count)
    return out


def passwd_entries() -> list[tuple[str, int]]:
    return [(p.pw_name, p.pw_uid) for p in pwd.getpwall()]


def which(name: str) -> str | None:
    return shutil.which(name)


async def gather(cfg: HelperConfig, config_source: str, settings: EngineSettings,
                 images_dir: Path, timeout: float = 10.0) -> HostFacts:
    """Look at the host (read-only) for everything :func:`judge` needs."""
    from .images import list_images

    imgs = await anyio.to_thread.run_sync(list_images, images_dir)
    kernel = str(imgs[0].kernel) if imgs else None
    accel = await _accel_facts(settings, kernel)
    storage = await anyio.to_thread.run_sync(_storage_facts, cfg)
    return await anyio.to_thread.run_sync(
        _local_facts, cfg, config_source, settings, imgs, images_dir, accel, storage, timeout)


async def _accel_facts(settings: EngineSettings, kernel: str | None
                       ) -> tuple[str | None, str, str | None]:
    """(kind, reason, error) of the engine's decision: the same probe boot it does."""
    from .vm.engine import hostcheck

    try:
        rng = UidRange(settings.uid_base, settings.uid_count)
    except VmError:
        return None, "", None  # the uid-range line says why
    if kernel is None and settings.accel != "tcg":
        try:
            st = await anyio.Path("/dev/kvm").stat()
        except OSError:
            return None, "no /dev/kvm", None
        usable, _gid, why = accel_mod.kvm_access(st.st_mode, st.st_gid)
        return None, ("not probed (no image to boot)" if usable else why), None
    try:
        d = await hostcheck.decide_accelerator(settings, rng, kernel or "")
    except VmError as exc:
        return None, "", exc.message
    return d.kind, d.reason, None


def _local_facts(cfg: HelperConfig, config_source: str, settings: EngineSettings,
                 imgs: list[Image], images_dir: Path,
                 accel: tuple[str | None, str, str | None], storage: tuple[bool, str],
                 timeout: float) -> HostFacts:
    from .vm.engine import hostcheck

    qemu = which(settings.qemu_binary)
    machines, unpriv = None, None
    if qemu is not None:
        rc, out = run_quiet([qemu, "-machine", "help"])
        machines = out if rc == 0 else None
        try:
            rng = UidRange(settings.uid_base, settings.uid_count)
            r = hostcheck.unprivileged_qemu_check(qemu, rng.base + rng.count - 1, rng)
            unpriv = (r.ok, r.detail)
        except VmError as exc:
            unpriv = (False, exc.message)
    access = None
    for img in imgs:
        for p, is_dir in ((str(img.directory), True), (str(img.kernel), False),
                          (str(img.initrd), False)):
            access = access or hostcheck.world_readable_path_problem(p, directory=is_dir)
    nft = which("nft")
    nft_error = None
    if nft is not None:
        rc, out = run_quiet([nft, "list", "tables"])
        nft_error = None if rc == 0 else (out.splitlines() or ["failed"])[-1][:200]
    bridge_kind, br_nf = _bridge_facts(cfg.net.bridge)
    run_dir = Path(settings.run_dir)
    run_check = hostcheck.private_dir_check("run-dir", run_dir) if run_dir.exists() else None
    sock_stat, sock_dir = socket_facts(cfg.server.socket)
    answer, helper_error = _ask_helper(cfg.server.socket, timeout)
    authorization = str(getattr(cfg.server, "authorization", "group"))
    pkcheck = which("pkcheck")
    return HostFacts(
        config_source=config_source, is_root=os.geteuid() == 0,
        qemu_binary=settings.qemu_binary, qemu_path=qemu, qemu_machines=machines,
        unprivileged_qemu=unpriv, accel_mode=settings.accel,
        kvm_present=os.path.exists("/dev/kvm"), accel_kind=accel[0],
        accel_reason=accel[1], accel_error=accel[2],
        vhost_vsock=os.path.exists("/dev/vhost-vsock"),
        storage_backend=cfg.storage.backend, storage=storage,
        nft_path=nft, nft_error=nft_error,
        tun_present=os.path.exists(TUN_DEVICE), tun_rw=os.access(TUN_DEVICE, os.R_OK | os.W_OK),
        bridge=cfg.net.bridge, bridge_kind=bridge_kind, br_netfilter=br_nf,
        images_dir=str(images_dir), images=tuple(i.name for i in imgs),
        image_access_problem=access,
        uid_base=settings.uid_base, uid_count=settings.uid_count,
        accounts_in_range=accounts_in_range(passwd_entries(), settings.uid_base,
                                            settings.uid_count),
        subid_overlaps=read_subids(settings.uid_base, settings.uid_count),
        run_dir=None if run_check is None else (run_check.ok, run_check.detail),
        run_dir_path=str(run_dir),
        socket_path=cfg.server.socket, socket_group=str(cfg.server.group),
        socket_gid=resolve_gid(cfg.server.group), socket_mode=cfg.server.socket_mode,
        socket_stat=sock_stat, socket_dir_problem=sock_dir,
        helper_answer=answer, helper_error=helper_error,
        authorization=authorization, pkcheck_path=pkcheck, polkit_policy=POLKIT_POLICY.exists(),
        polkit_answer=_ask_polkit(pkcheck, timeout)
        if authorization == "polkit" and pkcheck is not None else None,
    )


def _storage_facts(cfg: HelperConfig) -> tuple[bool, str]:
    if cfg.storage.backend == "qcow2":
        tool = which("qemu-img")
        if tool is None:
            return False, "qemu-img not found on PATH"
        rc, out = run_quiet([tool, "--version"])
        if rc != 0:
            return False, f"qemu-img does not work: {out[:200]}"
        return True, f"qcow2 volumes with {tool} ({out.splitlines()[0]})"
    if which("zfs") is None:
        return False, "zfs not found on PATH"
    dataset = cfg.storage.zfs.dataset
    pool = dataset.split("/")[0]
    rc, out = run_quiet(["zfs", "list", "-H", "-o", "name", pool])
    if rc != 0:
        return False, f"pool {pool} is not imported: {out[:200]}"
    rc, _ = run_quiet(["zfs", "list", "-H", "-o", "name", dataset])
    made = "exists" if rc == 0 else "will be created at start"
    return True, f"zfs pool {pool} imported; dataset {dataset} {made}"


def _bridge_facts(bridge: str) -> tuple[str, str]:
    from .net.links import PROC_SYS_NET, Links

    nf = PROC_SYS_NET / "bridge" / "bridge-nf-call-iptables"
    br_nf = nf.read_text().strip() if nf.exists() else "absent"
    try:
        links = Links()
    except Exception as exc:  # netlink unavailable: report, never crash the check
        return f"error: {exc}", br_nf
    try:
        idx = links.index(bridge)
        return ("absent" if idx is None else links.kind(idx) or "unknown"), br_nf
    except Exception as exc:
        return f"error: {exc}", br_nf
    finally:
        links.close()


def _ask_polkit(pkcheck: str, timeout: float) -> str:
    """Ask polkit about this process and the admin class, as the helper asks."""
    from .actions import Action
    from .polkit import Subject, decision_from_exit, parse_start_time, pkcheck_argv

    subject = Subject(os.getpid(), parse_start_time(Path("/proc/self/stat").read_text()),
                      os.getuid())
    rc, _ = run_quiet(pkcheck_argv(Action.ADMIN, subject, pkcheck), timeout)
    return "unreachable" if rc < 0 else decision_from_exit(rc).value


def _ask_helper(path: str, timeout: float) -> tuple[str | None, str]:
    try:
        with BlockingHelperClient(path, timeout=timeout, client="agentiso-helper check") as c:
            h = c.hello
            return f"{h.server} answers (protocol {h.version}, up {h.uptime_s:.0f} s)", ""
    except (OSError, WireError) as exc:
        return None, str(exc) or type(exc).__name__
