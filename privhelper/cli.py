"""``agentiso-helper``: the daemon (``serve``) and its admin commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import anyio
import msgspec
import structlog

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import ProtocolError

from . import __version__, log, systemd
from .config import DEFAULT_CONFIG_PATH, HelperConfig, load_config
from .errors import ConfigError, HelperError
from .registry import Registry
from .server import HelperServer, bind_listener, listener_from_fd
from .service import WorkspaceService
from .storage import make_backend
from .vm.engine import EngineSettings, VmEngine
from .vmservice import VmService


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

    st = sub.add_parser("status", help="connect to the helper and show who it sees")
    st.add_argument("--socket", type=Path, default=None)
    st.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    st.add_argument("--timeout", type=float, default=10.0)
    return p


def _apply_overrides(cfg: HelperConfig, args: argparse.Namespace) -> HelperConfig:
    server, paths = cfg.server, cfg.paths
    if args.socket is not None:
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
    )


def engine_settings(cfg: HelperConfig, state_dir: Path) -> EngineSettings:
    try:
        return msgspec.convert({**cfg.vm, "state_dir": str(state_dir)}, EngineSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[vm]: {exc}") from None


async def _serve(cfg: HelperConfig) -> None:
    logger = structlog.get_logger("agentiso.helper")
    state_dir = _ensure_dir(Path(cfg.paths.state_dir))
    memory_dir = _ensure_dir(state_dir / "memory")
    settings = engine_settings(cfg, state_dir)
    service = await _build_service(cfg, state_dir)
    fds = systemd.listen_fds()
    systemd.clear_listen_env()
    async with VmEngine.running(settings) as engine, anyio.create_task_group() as tg:
        vms = VmService(ws=service, engine=engine, tg=tg, memory_dir=memory_dir)
        await vms.adopt()
        server = HelperServer(
            cfg, handlers={**service.handlers(), **vms.handlers()}, open_guest=vms.open_guest
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


def _status(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None:
        path = Path(load_config(args.config).server.socket)
    try:
        with BlockingHelperClient(str(path), timeout=args.timeout, client="status") as c:
            who = c.request(hp.WhoAmI(id=0))
            assert isinstance(who, hp.Identity)
            print(f"helper:   {c.hello.server} (protocol {c.hello.version})")
            print(f"socket:   {path}")
            print(f"uptime:   {c.hello.uptime_s:.1f} s")
            print(f"you are:  uid {who.uid} gid {who.gid} pid {who.pid}"
                  f"{' (admin)' if who.admin else ''}")
    except (OSError, ProtocolError) as exc:
        print(f"agentiso-helper status: cannot talk to {path}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    log.configure(args.log_level)
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
