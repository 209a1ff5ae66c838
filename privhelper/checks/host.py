"""The gathering half of ``agentiso-helper check`` (the judging half is
:mod:`agentiso.privhelper.check`): read-only looks at the host that fill a
:class:`~agentiso.privhelper.check.HostFacts`.  Nothing here creates, changes
or removes anything on the host; every command it runs only reports.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import anyio

from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import WireError

from ..check import POLKIT_POLICY, HostFacts, accounts_in_range, subid_overlaps
from ..config import HelperConfig, resolve_gid
from ..images import Image
from ..net.tap import TUN_DEVICE
from ..vm import accel as accel_mod
from ..vm.engine.types import EngineSettings
from ..vm.errors import VmError
from ..vm.uids import UidRange


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


def members(gid: int | None) -> tuple[str, ...]:
    if gid is None:
        return ()
    try:
        return tuple(sorted(grp.getgrgid(gid).gr_mem))
    except KeyError:
        return ()


def which(name: str) -> str | None:
    return shutil.which(name)


async def gather(cfg: HelperConfig, config_source: str, settings: EngineSettings,
                 images_dir: Path, timeout: float = 10.0) -> HostFacts:
    """Look at the host (read-only) for everything :func:`judge` needs."""
    from ..images import list_images

    imgs = await anyio.to_thread.run_sync(list_images, images_dir)
    kernel = str(imgs[0].kernel) if imgs else None
    accel = await _accel_facts(settings, kernel)
    storage = await anyio.to_thread.run_sync(_storage_facts, cfg)
    return await anyio.to_thread.run_sync(
        _local_facts, cfg, config_source, settings, imgs, images_dir, accel, storage, timeout)


async def _accel_facts(settings: EngineSettings, kernel: str | None
                       ) -> tuple[str | None, str, str | None]:
    """(kind, reason, error) of the engine's decision: the same probe boot it does."""
    from ..vm.engine import hostcheck

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
    from ..vm.engine import hostcheck

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
    gid = resolve_gid(cfg.server.group)
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
        socket_gid=gid, group_members=members(gid), socket_mode=cfg.server.socket_mode,
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
    from ..net.links import PROC_SYS_NET, Links

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
    from ..actions import Action
    from ..polkit import Subject, decision_from_exit, parse_start_time, pkcheck_argv

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
