"""``agentiso-helper``: the daemon (``serve``) and its admin commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
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

    client_cmd("status", "connect to the helper and show who it sees")
    client_cmd("list", "every user's volumes and VMs (root)")
    g = client_cmd("gc", "find and remove resources no user owns (root)")
    g.add_argument("--dry-run", action="store_true", help="only report")

    lg = sub.add_parser("logs", help="a VM's serial console and QEMU stderr (root)")
    lg.add_argument("vm", help="the VM's key (see 'list')")
    lg.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    lg.add_argument("--state-dir", type=Path)
    lg.add_argument("--bytes", type=int, default=16384)

    ck = sub.add_parser("check", help="can this host run workspaces, and how")
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
                _print_listing(c)
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


def _print_listing(c: BlockingHelperClient) -> None:
    listing = _expect(c.request(hp.AdminList(id=0)), hp.AdminListing)
    print(f"{'OWNER':>8}  {'VM':<20} {'KEY':<14} {'STATE':<9} {'PID':>7} {'QEMU UID':>9}  VOLUME")
    for m in listing.vms:
        print(f"{m.owner:>8}  {m.name:<20} {m.key:<14} {m.state:<9} {m.pid:>7} "
              f"{m.qemu_uid:>9}  {m.volume}")
    print()
    print(f"{'OWNER':>8}  {'VOLUME':<20} {'KEY':<14} {'SIZE':>12}  SNAPSHOTS")
    for v in listing.volumes:
        print(f"{v.owner:>8}  {v.name:<20} {v.key:<14} {v.size_bytes:>12}  "
              f"{','.join(v.snapshots) or '-'}")


def _logs(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    state = args.state_dir or Path(cfg.paths.state_dir)
    d = state / "vm" / "logs" / args.vm
    if not d.is_dir():
        print(f"agentiso-helper logs: no logs for VM {args.vm!r} in {d.parent}", file=sys.stderr)
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

    settings = engine_settings(cfg, Path(cfg.paths.state_dir))
    facts = await check.gather(cfg, source, settings, Path(cfg.paths.images_dir))
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
