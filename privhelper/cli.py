"""``agentiso-helper``: the daemon (``serve``) and its admin commands."""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import UnexpectedMessage, WireError

from . import __version__, log, systemd
from .config import DEFAULT_CONFIG_PATH, HelperConfig, load_config
from .errors import ConfigError, HelperError
from .net.config import parse_net_config
from .net.manager import NetworkManager
from .registry import Registry
from .server import HelperServer, bind_listener, listener_from_fd
from .service import WorkspaceService
from .storage import make_backend
from .vm.engine import EngineSettings, VmEngine
from .vms import VmServices
from .vms.templates import POOL_OWNER, TEMPLATE_OWNER


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentiso-helper", description=__doc__)
    p.add_argument("--version", action="version", version=f"agentiso-helper {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the helper daemon")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    s.add_argument("--socket", type=Path, help="bind this path (ignored under socket activation)")
    s.add_argument("--group", help="group allowed to connect (name or gid)")
    s.add_argument("--state-dir", type=Path)
    s.add_argument("--images-dir", type=Path)
    s.add_argument("--log-level", default="info")

    def client_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", type=Path, default=None)
        c.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
        c.add_argument("--timeout", type=float, default=60.0)
        return c

    client_cmd("status", "is the helper up, who it sees you as (root: use per owner)")
    client_cmd("list", "every owner's VMs and volumes: names, states, resource use (root)")
    g = client_cmd("gc", "find and remove resources no user owns (root)")
    g.add_argument("--dry-run", action="store_true", help="only report")

    lg = sub.add_parser("logs", help="a VM's serial console and QEMU stderr (root)")
    lg.add_argument("vm", help="the VM's key, or its name with --owner (see 'list')")
    lg.add_argument("--owner", type=int, help="the uid owning the VM named (with a name)")
    lg.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    lg.add_argument("--state-dir", type=Path)
    lg.add_argument("--bytes", type=int, default=16384)

    ck = sub.add_parser("check", help="every prerequisite: pass, warn or fail, with the fix")
    ck.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    ck.add_argument("--state-dir", type=Path)
    ck.add_argument("--images-dir", type=Path)
    return p


def _apply_overrides(cfg: HelperConfig, args: argparse.Namespace) -> HelperConfig:
    server, paths = cfg.server, cfg.paths
    if getattr(args, "socket", None) is not None:
        server = msgspec.structs.replace(server, socket=str(args.socket))
    if getattr(args, "group", None) is not None:
        server = msgspec.structs.replace(server, group=args.group)
    if getattr(args, "state_dir", None) is not None:
        paths = msgspec.structs.replace(paths, state_dir=str(args.state_dir))
    if getattr(args, "images_dir", None) is not None:
        paths = msgspec.structs.replace(paths, images_dir=str(args.images_dir))
    return msgspec.structs.replace(cfg, server=server, paths=paths)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


async def _build_service(cfg: HelperConfig, state_dir: Path) -> WorkspaceService:
    storage = make_backend(cfg.storage, state_dir)
    try:
        await storage.setup()
    except HelperError as exc:
        # Keep serving (status, gc, diagnostics); volume requests will fail typed.
        structlog.get_logger("agentiso.helper").error("storage_unavailable", error=str(exc))
    return WorkspaceService(
        config=cfg,
        registry=Registry.load(state_dir / "registry.json"),
        storage=storage,
        images_dir=Path(cfg.paths.images_dir),
        memory_dir=_ensure_dir(state_dir / "memory"),
    )


async def _start_network(
    cfg: HelperConfig, state_dir: Path, known: list[str]
) -> NetworkManager | None:
    """Bridge, ruleset (re-applied whole) and leftovers gc; None if impossible here."""
    logger = structlog.get_logger("agentiso.helper")
    try:
        net = NetworkManager(parse_net_config(cfg.net), state_dir)
        report = await anyio.to_thread.run_sync(net.start, known)
    except HelperError as exc:
        logger.error("network_unavailable", error=str(exc), effect="VMs get no network")
        return None
    logger.info("network_ready", bridge=cfg.net.bridge, removed=report.removed_links)
    return net


def engine_settings(cfg: HelperConfig, state_dir: Path) -> EngineSettings:
    try:
        return msgspec.convert({**cfg.vm, "state_dir": str(state_dir)}, EngineSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[vm]: {exc}") from None


async def _serve(cfg: HelperConfig) -> None:
    logger = structlog.get_logger("agentiso.helper")
    state_dir = _ensure_dir(Path(cfg.paths.state_dir))
    settings = engine_settings(cfg, state_dir)
    service = await _build_service(cfg, state_dir)
    fds = systemd.listen_fds()
    systemd.clear_listen_env()
    net = await _start_network(cfg, state_dir, [m.key for m in service.registry.vms()])
    async with VmEngine.running(settings) as engine, anyio.create_task_group() as tg:
        vms = VmServices.build(service, engine, tg, net)
        await vms.lifecycle.adopt()
        tg.start_soon(vms.timer.run)
        tg.start_soon(vms.pool.run)
        server = HelperServer(
            cfg,
            handlers=vms.handlers(service),
            open_guest=vms.time_limits.open_guest,
        )
        if fds:
            listener = await listener_from_fd(fds[0])
            logger.info("listening", fd=fds[0], activation="systemd")
        else:
            path = Path(cfg.server.socket)
            listener = await bind_listener(path, cfg.server.socket_mode, server.allowed_gid)
            logger.info("listening", socket=str(path), group_gid=server.allowed_gid)
        if server.allowed_gid is None:
            logger.warning("group_missing", group=cfg.server.group, effect="only root may connect")
        systemd.notify("READY=1")
        tg.start_soon(server.serve, listener)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                # VMs keep running; the next helper adopts them.
                logger.info("stopping", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                break


_T = TypeVar("_T")


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return Path(load_config(args.config).server.socket)


def _client_command(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    try:
        with BlockingHelperClient(str(path), timeout=args.timeout, client=args.command) as c:
            if args.command == "status":
                _print_status(c, path)
            elif args.command == "list":
                print(render_listing(_gather_view(c)))
            elif args.command == "gc":
                report = _expect(c.request(hp.Gc(id=0, dry_run=args.dry_run)), hp.GcReport)
                verb = "would remove" if report.dry_run else "removed"
                for line in report.orphans:
                    print(f"{verb}: {line}")
                print(f"{len(report.orphans)} orphan(s)")
    except (OSError, WireError) as exc:
        print(f"agentiso-helper {args.command}: {path}: {exc}", file=sys.stderr)
        return 1
    return 0


def _expect(reply: object, kind: type[_T]) -> _T:
    """The helper's reply if it is of the expected kind (a peer's reply is checked, not assumed)."""
    if not isinstance(reply, kind):
        raise UnexpectedMessage(kind.__name__, reply)
    return reply


def _print_status(c: BlockingHelperClient, path: Path) -> None:
    who = _expect(c.request(hp.WhoAmI(id=0)), hp.Identity)
    print(f"helper:   {c.hello.server} (protocol {c.hello.version})")
    print(f"socket:   {path}")
    print(f"uptime:   {c.hello.uptime_s:.1f} s")
    admin = " (admin)" if who.admin else ""
    print(f"you are:  uid {who.uid} gid {who.gid} pid {who.pid}{admin}")
    if who.admin:
        view = _gather_view(c)
        print()
        print(render_totals(view))


@dataclass(frozen=True)
class AdminView:
    """What ``list`` and ``status`` show: the helper's listing, each owner's
    VMs and volumes (addresses, disk use), QEMU memory use by pid, workspace
    names from the owners' catalogs where readable."""

    listing: hp.AdminListing
    vms: dict[int, list[hp.VmInfo]] = field(default_factory=dict)
    volumes: dict[int, list[hp.VolumeInfo]] = field(default_factory=dict)
    rss_kib: dict[int, int] = field(default_factory=dict)
    #: (owner, helper VM or volume name) -> workspace name.
    names: dict[tuple[int, str], str] = field(default_factory=dict)
    users: dict[int, str] = field(default_factory=dict)


def _pages(c: BlockingHelperClient, req: hp.HelperRequest, kind: type[_T]) -> list[_T]:
    """Every page of a listing (``req`` has a ``cursor``; see ``hp.Cursor``)."""
    pages: list[_T] = []
    cursor = 0
    while True:
        got = _expect(c.request(msgspec.structs.replace(req, cursor=cursor)), kind)
        pages.append(got)
        nxt = getattr(got, "next_cursor", None)
        if nxt is None:
            return pages
        if nxt <= cursor:
            raise HelperError("the helper's listing did not move on")
        cursor = nxt


def _gather_view(c: BlockingHelperClient) -> AdminView:
    parts = _pages(c, hp.AdminList(id=0), hp.AdminListing)
    listing = hp.AdminListing(
        id=0, volumes=[v for p in parts for v in p.volumes], vms=[m for p in parts for m in p.vms]
    )
    owners = sorted({v.owner for v in listing.vms} | {v.owner for v in listing.volumes})
    view = AdminView(listing)
    for uid in owners:
        view.vms[uid] = [m for p in _pages(c, hp.VmList(id=0, owner=uid), hp.Vms) for m in p.vms]
        view.volumes[uid] = [
            v for p in _pages(c, hp.VolumeList(id=0, owner=uid), hp.Volumes) for v in p.volumes
        ]
        view.users[uid] = _user_name(uid)
        view.names.update({(uid, k): n for k, n in _catalog_names(uid).items()})
    for m in listing.vms:
        if m.pid:
            rss = _rss_kib(m.pid)
            if rss is not None:
                view.rss_kib[m.pid] = rss
    return view


#: The helper's own owners, as the operator's listing names them.
HELPER_OWNERS = {TEMPLATE_OWNER: "templates", POOL_OWNER: "pool"}


def _user_name(uid: int) -> str:
    if uid in HELPER_OWNERS:
        return HELPER_OWNERS[uid]
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _catalog_names(uid: int) -> dict[str, str]:
    """Helper VM/volume name -> workspace name, from the owner's catalog at its
    default place (``~/.local/state/agentiso/catalog.db``), opened read-only;
    empty when it is elsewhere or unreadable (names are the user's data: the
    helper itself never holds them)."""
    try:
        home = Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        return {}
    db_path = home / ".local" / "state" / "agentiso" / "catalog.db"
    if not db_path.is_file():
        return {}
    try:
        db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = db.execute("SELECT name, vm, volume FROM workspaces").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    out: dict[str, str] = {}
    for name, vm, volume in rows:
        out[str(vm)] = out[str(volume)] = str(name)
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}M"


def render_listing(v: AdminView) -> str:
    """Every owner's VMs and volumes, with workspace names and resource use (pure)."""
    addr = {(uid, i.name): (i.network.address if i.network else "-")
            for uid, infos in v.vms.items() for i in infos}
    used = {(uid, i.name): i.used_bytes for uid, infos in v.volumes.items() for i in infos}
    out = [f"{'OWNER':<14} {'VM':<14} {'KEY':<14} {'STATE':<9} {'CPU':>3} {'MEM':>6} "
           f"{'RSS':>6} {'ADDRESS':<15} {'PID':>7} {'QEMU UID':>9} {'VOLUME':<14} WORKSPACE"]
    for m in sorted(v.listing.vms, key=lambda m: (m.owner, m.name)):
        rss = v.rss_kib.get(m.pid)
        out.append(
            f"{_owner(v, m.owner):<14} {m.name:<14} {m.key:<14} {m.state:<9} {m.vcpus:>3} "
            f"{m.memory_mib:>5}M {(_mib(rss * 1024) if rss is not None else '-'):>6} "
            f"{addr.get((m.owner, m.name), '-'):<15} {m.pid:>7} {m.qemu_uid:>9} "
            f"{m.volume:<14} {v.names.get((m.owner, m.name), '-')}")
    out.append("")
    out.append(f"{'OWNER':<14} {'VOLUME':<14} {'KEY':<14} {'SIZE':>7} {'USED':>7} "
               f"{'WORKSPACE':<20} SNAPSHOTS")
    for vol in sorted(v.listing.volumes, key=lambda x: (x.owner, x.name)):
        u = used.get((vol.owner, vol.name))
        out.append(
            f"{_owner(v, vol.owner):<14} {vol.name:<14} {vol.key:<14} {_mib(vol.size_bytes):>7} "
            f"{(_mib(u) if u is not None else '-'):>7} "
            f"{v.names.get((vol.owner, vol.name), '-'):<20} {','.join(vol.snapshots) or '-'}")
    out.append("")
    out.append(render_totals(v))
    return "\n".join(out)


def _owner(v: AdminView, uid: int) -> str:
    name = v.users.get(uid, str(uid))
    return f"{name}({uid})" if name != str(uid) else name


def render_totals(v: AdminView) -> str:
    """Per owner: running VMs, vCPUs, memory (asked, resident), volumes, disk used."""
    out = [f"{'OWNER':<14} {'VMS':>4} {'RUNNING':>7} {'CPU':>4} {'MEM':>7} {'RSS':>7} "
           f"{'VOLUMES':>7} {'DISK USED':>9}"]
    owners = sorted({m.owner for m in v.listing.vms} | {x.owner for x in v.listing.volumes})
    for uid in owners:
        vms = [m for m in v.listing.vms if m.owner == uid]
        live = [m for m in vms if m.state in ("starting", "running", "stopping")]
        rss = sum(v.rss_kib.get(m.pid, 0) for m in live) * 1024
        disk = sum(i.used_bytes for i in v.volumes.get(uid, []))
        nvol = sum(1 for x in v.listing.volumes if x.owner == uid)
        out.append(f"{_owner(v, uid):<14} {len(vms):>4} {len(live):>7} "
                   f"{sum(m.vcpus for m in live):>4} "
                   f"{sum(m.memory_mib for m in live):>6}M {_mib(rss):>7} {nvol:>7} "
                   f"{_mib(disk):>9}")
    if not owners:
        out.append("(nothing held)")
    return "\n".join(out)


def resolve_vm_key(vms: list[tuple[str, int, str]], ref: str, owner: int | None) -> str | None:
    """The key of the VM ``ref`` names: a key, or a name of ``owner``'s (or of
    the one owner holding that name when ``owner`` is None).  Pure."""
    if any(key == ref for key, _, _ in vms):
        return ref
    hits = [key for key, uid, name in vms if name == ref and owner in (None, uid)]
    return hits[0] if len(hits) == 1 else None


def _logs(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    state = args.state_dir or Path(cfg.paths.state_dir)
    key = args.vm
    reg_path = state / "registry.json"
    if reg_path.exists():
        try:
            reg = Registry.load(reg_path)
            found = resolve_vm_key([(m.key, m.owner, m.name) for m in reg.vms()], args.vm,
                                   args.owner)
        except HelperError:
            found = None  # an unreadable registry: try the argument as a key
        key = found or args.vm
    d = state / "vm" / "logs" / key
    if not d.is_dir():
        print(f"agentiso-helper logs: no logs for VM {args.vm!r} in {d.parent}\n"
              "give its key or its name (with --owner UID if two owners use it), "
              "as 'agentiso-helper list' shows them", file=sys.stderr)
        return 1
    for name in ("console.log", "stderr.log"):
        f = d / name
        print(f"==> {f} <==")
        if f.exists():
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - args.bytes))
                sys.stdout.write(fh.read().decode(errors="replace"))
        print()
    return 0


async def _check(cfg: HelperConfig, source: str) -> int:
    from . import check
    from .checks.host import gather

    settings = engine_settings(cfg, Path(cfg.paths.state_dir))
    facts = await gather(cfg, source, settings, Path(cfg.paths.images_dir))
    lines = check.judge(facts)
    print(check.render(lines))
    return check.exit_code(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("status", "list", "gc"):
        return _client_command(args)
    if args.command == "logs":
        return _logs(args)
    log.configure(getattr(args, "log_level", "warning"))
    if args.command == "check":
        try:
            cfg = _apply_overrides(load_config(args.config), args)
            engine_settings(cfg, Path(cfg.paths.state_dir))
        except HelperError as exc:
            print(f"FAIL  config             {exc}\n{'':<24} fix: correct that key "
                  f"(every key is optional; see docs/configuration.md)", file=sys.stdout)
            return 1
        source = str(args.config) if args.config.exists() else f"{args.config} absent: defaults"
        return anyio.run(_check, cfg, source)
    try:
        cfg = _apply_overrides(load_config(args.config), args)
        engine_settings(cfg, Path(cfg.paths.state_dir))  # fail early on a bad [vm]
    except HelperError as exc:
        print(f"agentiso-helper: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        structlog.get_logger("agentiso.helper").warning(
            "not_root", effect="privileged operations will fail"
        )
    anyio.run(_serve, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
