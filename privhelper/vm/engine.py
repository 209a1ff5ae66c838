"""The VM engine: the async API the helper's server calls to run microVMs.

Usage::

    async with VmEngine.running(EngineSettings(state_dir=...)) as engine:
        await engine.adopt_all()                 # VMs left by a previous helper
        status = await engine.start(VmConfig(...))
        path = engine.channel_socket(name)       # the guest relay connects here
        await engine.stop(name, agent_shutdown=ask_guest)
        engine.forget(name)                      # drop record, run dir, logs

Leaving the ``running`` context detaches from the VMs *without stopping them*:
QEMU outlives the helper and the next helper adopts it.

Per VM the engine keeps: the QEMU process (pidfd, watched so a death is seen
at once, even for adopted processes that are not our children), one QMP
connection, a reader of the serial console socket into a bounded log, and the
QEMU stderr file (capped periodically).  Its runtime facts are persisted in a
:class:`~.record.VmRecord` so adoption works after ``kill -9`` of the helper.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
import structlog
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import accel as accel_mod
from .boundedlog import BoundedLog, cap_appended_file, tail
from .cmdline import ROOT_DISK_NODE, build_argv
from .errors import (
    InvalidVmSpec,
    LaunchError,
    UnprivilegedImpossible,
    VmAlreadyExists,
    VmError,
    VmNotFound,
    VmStateConflict,
    VmTimeout,
    VmUnavailable,
)
from .launch import (
    ENGINE_TAG_VAR,
    QEMU_ENV,
    LaunchResources,
    prepare_private_dir,
    spawn_qemu,
)
from .procfs import (
    is_same_process,
    parse_status_ids,
    read_argv,
    read_host_tsc_khz,
    read_stat,
    read_status,
    scan_agentiso_qemus,
    uids_in_use,
    vm_name_from_argv,
)
from .qmp import Qmp
from .record import RecordStore, VmRecord
from .spec import (
    Accel,
    DiskLayer,
    Incoming,
    NetAttachment,
    VirtioSerialChannel,
    VmSpec,
    VsockChannel,
    check_name,
    check_path,
)
from .uids import UidRange, allocate_uid

log = structlog.get_logger("agentiso.helper.vm")

MIB = 1024 * 1024
MEMORY_FDNAME = "agentiso-memory"
#: Migration to a local file is bounded by the disk, not a network: no throttle.
MIGRATE_MAX_BANDWIDTH = 64 * 1024 * MIB


class EngineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Configuration of the engine (a ``[vm]`` table in the helper's config)."""

    #: Records and logs live under ``<state_dir>/vm``.
    state_dir: str
    #: Per-VM private directories with QEMU's sockets.  Keep it short: a Unix
    #: socket path has at most 107 bytes.  Must be traversable by other uids.
    run_dir: str = "/run/agentiso/vm"
    qemu_binary: str = "qemu-system-x86_64"
    #: Each QEMU runs as its own uid (and same-numbered gid) from this range.
    uid_base: int = 3_000_000
    uid_count: int = 4096
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: TCG translation cache per VM (QEMU's default is 1 GiB).
    tb_size_mib: int = 64
    console_max_bytes: int = 1 * MIB
    stderr_max_bytes: int = 256 * 1024
    console_tail_bytes: int = 4096
    qmp_timeout_s: float = 10.0
    start_timeout_s: float = 30.0
    incoming_timeout_s: float = 300.0
    probe_timeout_s: float = 5.0


class VmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a caller asks for; the engine adds sockets, uid, accelerator, fds."""

    name: str
    kernel: str
    cmdline: str
    #: Root disk chain, top (writable) layer first; paths are opened by the helper.
    disks: tuple[DiskLayer, ...]
    initrd: str | None = None
    vcpus: int = 1
    memory_mib: int = 256
    channel: Literal["virtio-serial", "vsock"] = "virtio-serial"
    guest_cid: int | None = None
    #: /dev/vhost-vsock opened by the caller (vsock only); stays the caller's.
    vhost_vsock_fd: int | None = None
    #: TAP fd opened by the caller; stays the caller's (the engine never closes it).
    net: NetAttachment | None = None
    #: Per-VM secret handed to the guest through fw_cfg.
    secret: bytes | None = None
    #: Readable fd of a memory image written by :meth:`VmEngine.save_memory`.
    incoming_fd: int | None = None


class VmState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


FINISHED = (VmState.STOPPED, VmState.CRASHED)


@dataclass(frozen=True)
class VmStatus:
    name: str
    state: VmState
    pid: int
    uid: int
    started_at: float
    adopted: bool
    channel_socket: str | None
    #: How it ended (``exit 0``, ``signal 9``, ``stopped by powerdown``...).
    exit_reason: str | None = None
    #: Last bytes of the serial console, for a VM that has ended.
    console_tail: str | None = None


@dataclass(frozen=True)
class VmEvent:
    """Published when a VM ends; ``state`` is STOPPED or CRASHED."""

    name: str
    state: VmState
    exit_reason: str
    console_tail: str


@dataclass(frozen=True)
class AdoptReport:
    adopted: list[str]
    dead: list[VmStatus]
    unreadable: dict[str, str]


@dataclass(frozen=True)
class Orphan:
    pid: int
    name: str
    uid: int


@dataclass(frozen=True)
class MemorySaveResult:
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


AgentShutdown = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class _Vm:
    record: VmRecord
    adopted: bool
    popen: subprocess.Popen[bytes] | None
    pidfd: int
    state: VmState = VmState.STARTING
    qmp: Qmp | None = None
    tg: TaskGroup | None = None
    events_scope: anyio.CancelScope | None = None
    qmp_lock: anyio.Lock = field(default_factory=anyio.Lock)
    tasks_done: anyio.Event | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)
    console_eof: anyio.Event = field(default_factory=anyio.Event)
    console: BoundedLog | None = None
    exit_reason: str | None = None
    stop_requested: bool = False
    stop_method: str | None = None
    guest_shutdown: bool = False

    @property
    def name(self) -> str:
        return self.record.name


def _uid_unassigned(uid: int) -> bool:
    """A uid no account uses (a uid from the range must not be anyone's)."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


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


class VmEngine:
    def __init__(self, settings: EngineSettings, task_group: TaskGroup) -> None:
        self.settings = settings
        self._tg = task_group
        self._vms: dict[str, _Vm] = {}
        self._uids = UidRange(settings.uid_base, settings.uid_count)
        base = Path(settings.state_dir) / "vm"
        self._records = RecordStore(base / "records")
        self._logs = base / "logs"
        self._run = Path(settings.run_dir)
        #: Marks the QEMUs this engine (this run dir) starts; see find_orphans.
        self._tag = hashlib.sha256(str(self._run.resolve()).encode()).hexdigest()[:16]
        self._accel: accel_mod.AccelDecision | None = None
        self._accel_lock = anyio.Lock()
        self._subscribers: list[MemoryObjectSendStream[VmEvent]] = []
        self._tsc_khz = read_host_tsc_khz()
        self._starting: set[str] = set()
        self._records.ensure()
        self._logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        # QEMU never touches it (its sockets come as fds): the helper's alone.
        self._run.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._run, 0o700)

    # --- lifecycle of the engine itself ------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, settings: EngineSettings) -> AsyncIterator[VmEngine]:
        async with anyio.create_task_group() as tg:
            engine = cls(settings, tg)
            try:
                yield engine
            finally:
                with anyio.CancelScope(shield=True):
                    await engine.detach_all()
                tg.cancel_scope.cancel()

    async def detach_all(self) -> None:
        """Stop watching every VM; the QEMU processes keep running."""
        for vm in list(self._vms.values()):
            await self._detach(vm)
        for s in self._subscribers:
            s.close()
        self._subscribers.clear()

    def subscribe(self, buffer: int = 64) -> MemoryObjectReceiveStream[VmEvent]:
        """A stream of :class:`VmEvent` (a VM ended).  Slow readers lose events."""
        send, recv = anyio.create_memory_object_stream[VmEvent](buffer)
        self._subscribers.append(send)
        return recv

    # --- accelerator -------------------------------------------------------------------

    async def probe_accelerator(self, kernel: str) -> accel_mod.AccelDecision:
        """KVM or TCG, decided once per engine (see :mod:`.accel`)."""
        async with self._accel_lock:
            if self._accel is None:
                self._accel = await self._probe(kernel)
                log.info("accelerator", kind=self._accel.kind, reason=self._accel.reason)
            return self._accel

    async def _probe(self, kernel: str) -> accel_mod.AccelDecision:
        mode = self.settings.accel
        if mode == "tcg":
            return accel_mod.AccelDecision("tcg", "configured")
        try:
            st = os.stat("/dev/kvm")
        except OSError:
            return self._kvm_unusable(mode, "no /dev/kvm")
        usable, gid, why = accel_mod.kvm_access(st.st_mode, st.st_gid)
        if not usable:
            return self._kvm_unusable(mode, why)
        uid = self._uids.base + self._uids.count - 1  # the probe's uid: the range's last
        if os.geteuid() != 0:
            uid = os.geteuid()
        ok, detail = await accel_mod.kvm_boot_test(
            self.settings.qemu_binary,
            kernel,
            uid,
            gid if gid is not None else (uid if os.geteuid() == 0 else os.getegid()),
            self.settings.probe_timeout_s,
        )
        if ok:
            return accel_mod.AccelDecision("kvm", detail, gid)
        return self._kvm_unusable(mode, detail)

    @staticmethod
    def _kvm_unusable(mode: str, why: str) -> accel_mod.AccelDecision:
        if mode == "kvm":
            raise VmUnavailable(f"KVM is configured but unusable: {why}")
        return accel_mod.AccelDecision("tcg", why)

    # --- start -------------------------------------------------------------------------

    def _taken_uids(self) -> set[int]:
        taken = {v.record.uid for v in self._vms.values() if v.state not in FINISHED}
        records, _ = self._records.load_all()
        taken |= {r.uid for r in records if r.name not in self._vms}
        # Also any process still running as a range uid (an orphan, another helper).
        taken |= uids_in_use(self._uids.base, self._uids.base + self._uids.count)
        return taken

    async def start(self, cfg: VmConfig) -> VmStatus:
        """Start a VM and return once it runs (or is restored from memory).

        The caller's fds (TAP, vhost, incoming) are passed to QEMU and stay
        open on the caller's side; close them after this returns.
        """
        check_name(cfg.name)
        if cfg.name in self._starting:
            raise VmAlreadyExists(f"VM {cfg.name} is being started")
        old = self._vms.get(cfg.name)
        if old is not None:
            if old.state not in FINISHED:
                raise VmAlreadyExists(f"VM {cfg.name} is running")
            self.forget(cfg.name)
        if old is None and self._records.path(cfg.name).exists():
            # A record we have not adopted may be a live QEMU: never clobber it.
            raise VmAlreadyExists(f"VM {cfg.name} has a record: call adopt_all() first")
        self._starting.add(cfg.name)
        try:
            return await self._start(cfg)
        finally:
            self._starting.discard(cfg.name)

    async def _start(self, cfg: VmConfig) -> VmStatus:
        decision = await self.probe_accelerator(cfg.kernel)
        if os.geteuid() == 0:
            uid = allocate_uid(self._uids, self._taken_uids(), _uid_unassigned)
            gid = decision.kvm_gid if decision.kind == "kvm" and decision.kvm_gid else uid
        else:
            uid, gid = os.geteuid(), os.getegid()
            log.warning("qemu_runs_as_helper_uid", uid=uid, reason="the helper is not root")

        run = self._run / cfg.name
        logs = self._logs / cfg.name
        if len(str(run / "console.sock").encode()) > 107:
            raise InvalidVmSpec(f"run_dir {self._run} is too long for Unix socket paths")
        try:
            # Root-only: the sockets here are made and bound by the helper and
            # handed to QEMU as listening fds, so an unprivileged QEMU can never
            # swap one for a symlink to someone else's socket.
            prepare_private_dir(run, os.getuid(), os.getgid())
            logs.mkdir(mode=0o700, exist_ok=True)
            for old_log in logs.iterdir():
                old_log.unlink()

            if cfg.channel == "virtio-serial":
                channel: VirtioSerialChannel | VsockChannel = VirtioSerialChannel(
                    socket_path=str(run / "agent.sock")
                )
            else:
                if cfg.guest_cid is None:
                    raise InvalidVmSpec("a vsock channel needs a guest CID")
                if cfg.secret is None:
                    # Any local process may connect to a guest over vsock: the
                    # agent only answers whoever presents the per-VM secret.
                    raise InvalidVmSpec("a vsock channel needs a per-VM secret")
                channel = VsockChannel(guest_cid=cfg.guest_cid, vhost_fd=cfg.vhost_vsock_fd)
            if cfg.secret is not None and not 16 <= len(cfg.secret) <= 4096:
                raise InvalidVmSpec("the secret must be 16 to 4096 bytes")

            # What is recorded: paths only, no fd numbers of this launch.
            spec = VmSpec(
                name=cfg.name,
                kernel=cfg.kernel,
                initrd=cfg.initrd,
                cmdline=cfg.cmdline,
                disks=cfg.disks,
                vcpus=cfg.vcpus,
                memory_mib=cfg.memory_mib,
                channel=channel,
                qmp_socket=str(run / "qmp.sock"),
                console_socket=str(run / "console.sock"),
                accel=Accel(kind=decision.kind, tb_size_mib=self.settings.tb_size_mib),
                net=cfg.net,
                incoming=None if cfg.incoming_fd is None else Incoming(fd=cfg.incoming_fd),
                tsc_khz=self._tsc_khz if decision.kind == "tcg" else None,
                start_paused=True,
            )
            build_argv(spec)  # validate before opening anything
            stderr_path = logs / "stderr.log"
            with LaunchResources() as res:
                launch = msgspec.structs.replace(
                    spec,
                    kernel=res.boot_file(cfg.kernel),
                    initrd=None if cfg.initrd is None else res.boot_file(cfg.initrd),
                    disks=res.open_disks(cfg.disks),
                    qmp_fd=res.listen(spec.qmp_socket),
                    console_fd=res.listen(spec.console_socket),
                    fw_cfg_secret_fd=None if cfg.secret is None else res.secret(cfg.secret),
                )
                if isinstance(channel, VsockChannel):
                    vfd = channel.vhost_fd
                    if vfd is None:
                        # QEMU (unprivileged) cannot open the device: the helper does.
                        vfd = res.vhost_vsock()
                    launch = msgspec.structs.replace(
                        launch, channel=msgspec.structs.replace(channel, vhost_fd=vfd)
                    )
                else:
                    launch = msgspec.structs.replace(
                        launch,
                        channel=msgspec.structs.replace(
                            channel, listen_fd=res.listen(channel.socket_path)
                        ),
                    )
                argv = build_argv(launch, self.settings.qemu_binary)
                pass_fds = [*res.fds]
                for fd in (
                    cfg.net.tap_fd if cfg.net else None,
                    cfg.vhost_vsock_fd if cfg.channel == "vsock" else None,
                    cfg.incoming_fd,
                ):
                    if fd is not None:
                        pass_fds.append(fd)
                stderr_fd = os.open(
                    stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
                try:
                    popen = spawn_qemu(
                        argv,
                        uid=uid,
                        gid=gid,
                        pass_fds=pass_fds,
                        stderr_fd=stderr_fd,
                        cwd=Path("/"),
                        engine_tag=self._tag,
                    )
                finally:
                    os.close(stderr_fd)
        except BaseException:
            # Nothing of a VM that never ran is left behind.
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)
            raise
        pidfd = os.pidfd_open(popen.pid)
        st = read_stat(popen.pid)
        record = VmRecord(
            name=cfg.name,
            pid=popen.pid,
            pid_start_time=st.start_time if st else 0,
            uid=uid,
            gid=gid,
            run_dir=str(run),
            qmp_socket=spec.qmp_socket,
            console_socket=spec.console_socket,
            channel_socket=channel.socket_path
            if isinstance(channel, VirtioSerialChannel)
            else None,
            console_log=str(logs / "console.log"),
            stderr_log=str(stderr_path),
            spec=spec,
            started_at=time.time(),
        )
        vm = _Vm(record=record, adopted=False, popen=popen, pidfd=pidfd)
        self._vms[cfg.name] = vm
        self._records.save(record)
        log.info("vm_spawned", vm=cfg.name, pid=popen.pid, uid=uid, accel=decision.kind)
        try:
            await self._attach(vm, self.settings.start_timeout_s)
            if cfg.incoming_fd is not None:
                await self._wait_incoming(vm)
            await self._exec(vm, "cont")
            vm.state = VmState.RUNNING
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._abort_start(vm)
            stderr = self.stderr_tail(cfg.name, 1024).decode(errors="replace").strip()
            if vm.exited.is_set():
                self.forget(cfg.name)  # a failed start leaves nothing behind
            if isinstance(exc, VmError):
                raise LaunchError(
                    f"VM {cfg.name} failed to start: {exc.message}; QEMU said: {stderr}"
                ) from None
            raise
        return self.status(cfg.name)

    async def _abort_start(self, vm: _Vm) -> None:
        vm.stop_requested = True
        vm.stop_method = "start failed"
        self._signal(vm, signal.SIGKILL)
        with anyio.move_on_after(5):
            await vm.exited.wait()

    async def _wait_incoming(self, vm: _Vm) -> None:
        with anyio.move_on_after(self.settings.incoming_timeout_s):
            while True:
                info = await self._exec(vm, "query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise LaunchError(f"restoring memory failed: {info.get('error-desc', status)}")
                await anyio.sleep(0.02)
        raise VmTimeout("restoring memory did not complete in time")

    # --- attaching to a QEMU (fresh or adopted) ----------------------------------------

    async def _attach(self, vm: _Vm, timeout: float) -> None:
        vm.console = BoundedLog(Path(vm.record.console_log), self.settings.console_max_bytes)
        vm.tg = await self._tg.start(self._supervise, vm)
        # QMP and the console socket appear during QEMU's init; retry until then.
        deadline = anyio.current_time() + timeout
        console: SocketStream | None = None
        try:
            while True:
                if vm.exited.is_set():
                    raise LaunchError(f"QEMU exited ({vm.exit_reason})")
                try:
                    if console is None:
                        console = await anyio.connect_unix(vm.record.console_socket)
                    qmp = Qmp(vm.name, self.settings.qmp_timeout_s)
                    await qmp.connect(
                        vm.record.qmp_socket, timeout=max(0.1, deadline - anyio.current_time())
                    )
                    break
                except (OSError, VmUnavailable):
                    if anyio.current_time() > deadline:
                        raise VmTimeout("QEMU's QMP socket did not come up in time") from None
                    await anyio.sleep(0.02)
        except BaseException:
            if console is not None:
                await console.aclose()
            raise
        vm.tg.start_soon(self._pump_console, vm, console)
        await self._use_qmp(vm, qmp)

    async def _supervise(self, vm: _Vm, *, task_status: TaskStatus[TaskGroup]) -> None:
        done = vm.tasks_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, vm)
                task_status.started(tg)
        finally:
            done.set()

    async def _detach(self, vm: _Vm, *, from_watcher: bool = False) -> None:
        """Stop watching ``vm`` (QEMU keeps running) and release what we hold."""
        if vm.tg is not None:
            vm.tg.cancel_scope.cancel()
            vm.tg = None
            if not from_watcher and vm.tasks_done is not None:
                # The watcher must be off the pidfd before the fd is closed.
                with anyio.move_on_after(5):
                    await vm.tasks_done.wait()
        if vm.qmp is not None:
            await vm.qmp.close()
            vm.qmp = None
        if vm.console is not None:
            vm.console.close()
            vm.console = None
        if vm.pidfd >= 0:
            os.close(vm.pidfd)
            vm.pidfd = -1

    async def _watch(self, vm: _Vm) -> None:
        """Wait for QEMU's end (pidfd), capping its stderr file meanwhile."""
        stderr = Path(vm.record.stderr_log)
        while True:
            with anyio.move_on_after(2.0):
                await anyio.wait_readable(vm.pidfd)
                break
            cap_appended_file(stderr, self.settings.stderr_max_bytes)
        rc: int | None = None
        if vm.popen is not None:
            # The pidfd is readable: the child has exited, so this reaps at once.
            rc = vm.popen.poll()
        # Give the console reader a moment to drain QEMU's last words, and the
        # QMP reader to deliver its last events (a guest-initiated SHUTDOWN).
        with anyio.move_on_after(0.5):
            await vm.console_eof.wait()
        if vm.qmp is not None:
            await vm.qmp.wait_disconnected(0.5)
            vm.guest_shutdown |= vm.qmp.events.guest_shutdown
        if rc is None:
            reason = "QEMU exited"
        elif rc < 0:
            reason = f"QEMU killed by signal {-rc} ({signal.Signals(-rc).name})"
        else:
            reason = f"QEMU exited with status {rc}"
        if vm.stop_requested and vm.stop_method:
            reason = f"{reason} after {vm.stop_method}"
        clean = vm.stop_requested or vm.guest_shutdown or (rc == 0)
        vm.state = VmState.STOPPED if clean else VmState.CRASHED
        vm.exit_reason = reason
        cap_appended_file(stderr, self.settings.stderr_max_bytes)
        log.info("vm_ended", vm=vm.name, state=str(vm.state), reason=reason)
        vm.exited.set()
        event = VmEvent(vm.name, vm.state, reason, self._console_tail_text(vm))
        for s in list(self._subscribers):
            try:
                s.send_nowait(event)
            except anyio.WouldBlock:
                pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(s)
        with anyio.CancelScope(shield=True):
            await self._detach(vm, from_watcher=True)

    async def _pump_console(self, vm: _Vm, stream: SocketStream | None) -> None:
        """Copy the serial console socket into the bounded log; reconnect if it drops."""
        while not vm.exited.is_set():
            if stream is None:
                try:
                    stream = await anyio.connect_unix(vm.record.console_socket)
                except OSError:
                    await anyio.sleep(0.2)
                    continue
                vm.console_eof = anyio.Event()
            try:
                async with stream:
                    async for chunk in stream:
                        if vm.console is not None:
                            vm.console.write(chunk)
            except (anyio.BrokenResourceError, OSError):
                pass
            stream = None
            vm.console_eof.set()
            await anyio.sleep(0.1)

    async def _pump_events(
        self, vm: _Vm, qmp: Qmp, *, task_status: TaskStatus[anyio.CancelScope]
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await self._follow_events(vm, qmp)

    @staticmethod
    async def _follow_events(vm: _Vm, qmp: Qmp) -> None:
        async for ev in qmp.events:
            kind = ev["event"]
            data = ev.get("data")
            if kind == "SHUTDOWN" and isinstance(data, dict) and data.get("guest"):
                vm.guest_shutdown = True
            elif kind == "STOP" and vm.state == VmState.RUNNING:
                vm.state = VmState.PAUSED
            elif kind == "RESUME" and vm.state == VmState.PAUSED:
                vm.state = VmState.RUNNING

    # --- queries -------------------------------------------------------------------------

    def _get(self, name: str) -> _Vm:
        vm = self._vms.get(name)
        if vm is None:
            raise VmNotFound(f"no VM named {name!r}")
        return vm

    def _alive(self, name: str) -> _Vm:
        vm = self._get(name)
        if vm.state in FINISHED or vm.exited.is_set():
            raise VmStateConflict(f"VM {name} is {vm.state}")
        return vm

    async def _connected_qmp(self, vm: _Vm) -> Qmp:
        """The VM's QMP connection, reconnecting if it was lost while QEMU lives."""
        # QEMU's QMP socket takes one client at a time: one reconnect at a time.
        async with vm.qmp_lock:
            if vm.qmp is not None:
                return vm.qmp
            if vm.exited.is_set() or vm.tg is None:
                raise VmUnavailable(f"VM {vm.name} has no QMP connection")
            qmp = Qmp(vm.name, self.settings.qmp_timeout_s)
            await qmp.connect(vm.record.qmp_socket)
            await self._use_qmp(vm, qmp)
            log.info("vm_qmp_reconnected", vm=vm.name)
            return qmp

    async def _use_qmp(self, vm: _Vm, qmp: Qmp) -> None:
        assert vm.tg is not None
        if vm.events_scope is not None:
            vm.events_scope.cancel()
        vm.qmp = qmp
        vm.events_scope = await vm.tg.start(self._pump_events, vm, qmp)

    async def _exec(
        self, vm: _Vm, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command; a lost connection is dropped so the next call reconnects.

        The failed command is not retried: it may have run (``migrate``, ``quit``).
        """
        qmp = await self._connected_qmp(vm)
        try:
            return await qmp.execute(cmd, args, timeout)
        except VmUnavailable:
            if vm.qmp is qmp:
                vm.qmp = None
                await qmp.close()
            raise

    def names(self) -> list[str]:
        return sorted(self._vms)

    def status(self, name: str) -> VmStatus:
        vm = self._get(name)
        finished = vm.state in FINISHED
        return VmStatus(
            name=vm.name,
            state=vm.state,
            pid=vm.record.pid,
            uid=vm.record.uid,
            started_at=vm.record.started_at,
            adopted=vm.adopted,
            channel_socket=vm.record.channel_socket,
            exit_reason=vm.exit_reason,
            console_tail=self._console_tail_text(vm) if finished else None,
        )

    def channel_socket(self, name: str) -> str:
        """The Unix socket of the guest channel (virtio-serial) for the relay."""
        path = self._get(name).record.channel_socket
        if path is None:
            raise VmStateConflict(f"VM {name} uses vsock, not a virtio-serial socket")
        return path

    def record(self, name: str) -> VmRecord:
        return self._get(name).record

    def console_tail(self, name: str, nbytes: int = 4096) -> bytes:
        return tail(Path(self._get(name).record.console_log), max(0, min(nbytes, 1 * MIB)))

    def stderr_tail(self, name: str, nbytes: int = 4096) -> bytes:
        return tail(Path(self._get(name).record.stderr_log), max(0, min(nbytes, 1 * MIB)))

    def _console_tail_text(self, vm: _Vm) -> str:
        data = tail(Path(vm.record.console_log), self.settings.console_tail_bytes)
        return data.decode(errors="replace")

    async def qmp(
        self, name: str, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command on a live VM (for the server's own use, never a client's)."""
        return await self._exec(self._alive(name), cmd, args, timeout)

    async def query_status(self, name: str) -> str:
        info = await self.qmp(name, "query-status")
        return str(info.get("status")) if isinstance(info, dict) else "unknown"

    # --- control -----------------------------------------------------------------------

    def _signal(self, vm: _Vm, sig: int) -> None:
        if vm.pidfd < 0:
            return
        # pidfd_send_signal cannot hit a recycled pid.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(vm.pidfd, sig)

    async def pause(self, name: str) -> None:
        vm = self._alive(name)
        await self._exec(vm, "stop")
        vm.state = VmState.PAUSED

    async def resume(self, name: str) -> None:
        vm = self._alive(name)
        await self._exec(vm, "cont")
        vm.state = VmState.RUNNING

    async def stop(
        self,
        name: str,
        *,
        agent_shutdown: AgentShutdown | None = None,
        agent_timeout: float = 10.0,
        powerdown_timeout: float = 10.0,
        kill_timeout: float = 5.0,
    ) -> VmStatus:
        """Stop: ask the agent (caller's hook) -> ACPI powerdown -> quit -> SIGKILL.

        Each step gets its timeout; the first that ends QEMU wins and is named
        in ``exit_reason``.  QMP ``quit`` before SIGKILL lets QEMU flush its
        qcow2 metadata caches.
        """
        vm = self._get(name)
        if vm.exited.is_set():
            return self.status(name)
        # A paused guest can neither answer its agent nor see the power button.
        paused = vm.state == VmState.PAUSED
        vm.stop_requested = True
        vm.state = VmState.STOPPING
        log.info("vm_stopping", vm=name, paused=paused)
        steps: list[tuple[str, float]] = []
        if agent_shutdown is not None and not paused:
            steps.append(("agent shutdown", agent_timeout))
        if not paused:
            steps.append(("ACPI powerdown", powerdown_timeout))
        steps += [("QMP quit", 3.0), ("SIGKILL", kill_timeout)]
        for method, timeout in steps:
            vm.stop_method = method
            with anyio.move_on_after(timeout):
                try:
                    if method == "agent shutdown":
                        assert agent_shutdown is not None
                        await agent_shutdown()
                    elif method == "ACPI powerdown":
                        await self._exec(vm, "system_powerdown", timeout=timeout)
                    elif method == "QMP quit":
                        await self._exec(vm, "quit", timeout=timeout)
                    else:
                        self._signal(vm, signal.SIGKILL)
                except Exception as e:
                    # A failed step moves on to the next one (a QMP error may also
                    # just mean QEMU is exiting: give that a moment to show).
                    log.info("vm_stop_step_failed", vm=name, step=method, error=str(e))
                    with anyio.move_on_after(0.5):
                        await vm.exited.wait()
                    if vm.exited.is_set():
                        break
                    continue
                await vm.exited.wait()
            if vm.exited.is_set():
                break
        if not vm.exited.is_set():
            raise VmTimeout(f"VM {name} survived SIGKILL for {kill_timeout}s")
        return self.status(name)

    async def kill(self, name: str, timeout: float = 5.0) -> VmStatus:
        """SIGKILL QEMU now (a deliberate stop: the state becomes STOPPED)."""
        vm = self._get(name)
        if not vm.exited.is_set():
            vm.stop_requested = True
            vm.stop_method = "kill"
            self._signal(vm, signal.SIGKILL)
            with anyio.move_on_after(timeout):
                await vm.exited.wait()
            if not vm.exited.is_set():
                raise VmTimeout(f"VM {name} survived SIGKILL")
        return self.status(name)

    def forget(self, name: str) -> None:
        """Drop an ended VM: its record, run directory and logs."""
        vm = self._get(name)
        if not vm.exited.is_set():
            raise VmStateConflict(f"VM {name} is still {vm.state}")
        self._records.delete(name)
        shutil.rmtree(vm.record.run_dir, ignore_errors=True)
        shutil.rmtree(Path(vm.record.console_log).parent, ignore_errors=True)
        del self._vms[name]

    # --- memory snapshots ----------------------------------------------------------------

    async def save_memory(self, name: str, fd: int, timeout: float = 300.0) -> MemorySaveResult:
        """Pause the VM and write its whole state to ``fd`` (a file the caller opened).

        The VM stays paused afterwards so the caller can snapshot the disk in
        the same instant; then :meth:`resume` it or :meth:`stop` it.  The file
        restarts the VM with ``VmConfig(incoming_fd=...)`` and the same spec.
        """
        vm = self._alive(name)
        qmp = await self._connected_qmp(vm)
        t0 = time.monotonic()
        start_size = os.fstat(fd).st_size
        await qmp.execute("stop")
        vm.state = VmState.PAUSED
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATE_MAX_BANDWIDTH})
        await qmp.pass_fd(fd, MEMORY_FDNAME)
        await qmp.execute("migrate", {"uri": f"fd:{MEMORY_FDNAME}"})
        with anyio.move_on_after(timeout):
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    size = os.fstat(fd).st_size - start_size
                    return MemorySaveResult(size, time.monotonic() - t0)
                if status in ("failed", "cancelled"):
                    raise VmUnavailable(f"saving memory failed: {info.get('error-desc', status)}")
                await anyio.sleep(0.02)
        with contextlib.suppress(VmError):
            await qmp.execute("migrate_cancel")
        raise VmTimeout(f"saving the memory of {name} took longer than {timeout}s")

    # --- live disk snapshots -------------------------------------------------------------

    async def switch_to_overlay(
        self, name: str, path: str, fmt: Literal["qcow2"] = "qcow2", timeout: float = 30.0
    ) -> str:
        """Make a running VM write to a new top layer ``path`` (a live disk snapshot).

        ``path`` is an existing qcow2 whose backing is the current top (the
        storage layer made it).  The helper opens it and hands QEMU the fd
        (``add-fd``); QEMU adds it with an explicit ``backing: null`` and
        ``blockdev-snapshot`` puts it on top of the current top node, which
        QEMU stops writing from then on.  The record's chain and top node are
        updated so adoption and restarts see the new chain.  Returns the new
        top node's name.  Pause or freeze the guest around it for consistency.
        """
        vm = self._alive(name)
        check_path("overlay", path)
        if fmt != "qcow2":
            raise InvalidVmSpec("a live snapshot overlay must be qcow2")
        qmp = await self._connected_qmp(vm)
        rec = vm.record
        gen = rec.overlay_generation + 1
        node, file_node = f"{ROOT_DISK_NODE}-s{gen}", f"{ROOT_DISK_NODE}-s{gen}-file"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise InvalidVmSpec(f"cannot open overlay {path}: {e.strerror}") from None
        added: list[str] = []
        fdset: int | None = None
        try:
            with anyio.fail_after(timeout):
                sets = await self._exec(vm, "query-fdsets")
                used = [int(s["fdset-id"]) for s in sets] if isinstance(sets, list) else []
                fdset = max([len(rec.spec.disks), *used]) + 1
                await qmp.add_fd(fd, fdset, f"overlay-{gen}")
                await self._exec(
                    vm,
                    "blockdev-add",
                    {"driver": "file", "node-name": file_node,
                     "filename": f"/dev/fdset/{fdset}", "discard": "unmap"},
                )  # fmt: skip
                added.append(file_node)
                await self._exec(
                    vm,
                    "blockdev-add",
                    {"driver": fmt, "node-name": node, "file": file_node, "backing": None,
                     "discard": "unmap", "detect-zeroes": "unmap"},
                )  # fmt: skip
                added.append(node)
                await self._exec(vm, "blockdev-snapshot", {"node": rec.top_node, "overlay": node})
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                for n in reversed(added):
                    with contextlib.suppress(VmError):
                        await self._exec(vm, "blockdev-del", {"node-name": n})
                if fdset is not None:
                    with contextlib.suppress(VmError):
                        await self._exec(vm, "remove-fd", {"fdset-id": fdset})
            raise
        finally:
            os.close(fd)
        old = [msgspec.structs.replace(layer, read_only=True) for layer in rec.spec.disks]
        new_spec = msgspec.structs.replace(rec.spec, disks=(DiskLayer(format=fmt, path=path), *old))
        vm.record = msgspec.structs.replace(
            rec, spec=new_spec, top_node=node, overlay_generation=gen
        )
        self._records.save(vm.record)
        log.info("vm_disk_overlay", vm=name, node=node, fdset=fdset)
        return node

    # --- adoption and orphans --------------------------------------------------------------

    async def adopt_all(self) -> AdoptReport:
        """Re-attach to every recorded QEMU still alive; report the dead ones."""
        records, bad = self._records.load_all()
        adopted: list[str] = []
        dead: list[VmStatus] = []
        for rec in records:
            if rec.name in self._vms:
                continue
            vm = self._adopt_one(rec)
            self._vms[rec.name] = vm
            if vm.exited.is_set():
                dead.append(self.status(rec.name))
                continue
            try:
                await self._attach(vm, timeout=self.settings.qmp_timeout_s)
                qstatus = await self._exec(vm, "query-status")
                running = isinstance(qstatus, dict) and qstatus.get("running")
                vm.state = VmState.RUNNING if running else VmState.PAUSED
                adopted.append(rec.name)
                log.info("vm_adopted", vm=rec.name, pid=rec.pid)
            except VmError as e:
                if vm.exited.is_set():  # it died while we were attaching
                    dead.append(self.status(rec.name))
                    continue
                # Alive but QMP unreachable: keep watching it (death is still seen,
                # kill works, QMP reconnects on the next call) and keep its console.
                vm.state = VmState.RUNNING
                if vm.tg is not None:
                    vm.tg.start_soon(self._pump_console, vm, None)
                adopted.append(rec.name)
                log.warning("vm_adopted_without_qmp", vm=rec.name, error=e.message)
        return AdoptReport(adopted=adopted, dead=dead, unreadable=bad)

    def _adopt_one(self, rec: VmRecord) -> _Vm:
        pidfd = -1
        if self._is_our_qemu(rec):
            try:
                pidfd = os.pidfd_open(rec.pid)
            except ProcessLookupError:
                pidfd = -1
            # The pid could have been recycled between the check and the open.
            if pidfd >= 0 and not self._is_our_qemu(rec):
                os.close(pidfd)
                pidfd = -1
        vm = _Vm(record=rec, adopted=True, popen=None, pidfd=pidfd)
        if pidfd < 0:
            vm.state = VmState.CRASHED
            vm.exit_reason = "QEMU ended while no helper was watching"
            vm.exited.set()
        return vm

    @staticmethod
    def _is_our_qemu(rec: VmRecord) -> bool:
        if not is_same_process(rec.pid, rec.pid_start_time):
            return False
        argv = read_argv(rec.pid)
        return argv is not None and vm_name_from_argv(argv) == rec.name

    def find_orphans(self) -> list[Orphan]:
        """QEMU processes of this engine's (started in its run dir) that it
        does not know.  Another helper's QEMUs (a test helper beside the
        production one) are never this engine's orphans."""
        known = {v.record.pid for v in self._vms.values() if not v.exited.is_set()}
        orphans = []
        for pid, name in sorted(scan_agentiso_qemus().items()):
            if pid in known or not self._started_here(pid):
                continue
            text = read_status(pid)
            uid = parse_status_ids(text, "Uid")[0] if text else -1
            orphans.append(Orphan(pid=pid, name=name, uid=uid))
        return orphans

    def _started_here(self, pid: int) -> bool:
        """Our QEMUs carry this engine's tag in their environment."""
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"{ENGINE_TAG_VAR}={self._tag}".encode() in env

    def kill_orphan(self, orphan: Orphan) -> bool:
        """SIGKILL an orphan if the pid still is that QEMU; True if signalled."""
        try:
            pidfd = os.pidfd_open(orphan.pid)
        except ProcessLookupError:
            return False
        try:
            argv = read_argv(orphan.pid)
            if argv is None or vm_name_from_argv(argv) != orphan.name:
                return False
            if orphan.pid in {v.record.pid for v in self._vms.values() if not v.exited.is_set()}:
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    # --- diagnostics ---------------------------------------------------------------------

    async def check(self, kernel: str | None = None) -> list[CheckResult]:
        """Facts for ``agentiso-helper check``: can VMs run here, and how."""
        results: list[CheckResult] = []
        qemu = shutil.which(self.settings.qemu_binary)
        results.append(
            CheckResult("qemu", qemu is not None, qemu or f"{self.settings.qemu_binary} not found")
        )
        if qemu is not None:
            uid = self._uids.base + self._uids.count - 1
            results.append(
                await anyio.to_thread.run_sync(_unprivileged_qemu_check, qemu, uid, self._uids)
            )
        results.append(_private_dir_check("run-dir", self._run))
        results.append(_vsock_check())
        if kernel is not None:
            try:
                d = await self.probe_accelerator(kernel)
                results.append(CheckResult("accelerator", True, f"{d.kind}: {d.reason}"))
            except VmError as e:
                results.append(CheckResult("accelerator", False, e.message))
        return results


def _unprivileged_qemu_check(qemu: str, uid: int, rng: UidRange) -> CheckResult:
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


def _private_dir_check(name: str, path: Path) -> CheckResult:
    """The helper's own directory: owned by it and not writable by anyone else."""
    try:
        st = path.stat()
    except OSError as e:
        return CheckResult(name, False, f"{path}: {e.strerror}")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return CheckResult(name, False, f"{path} is not private to the helper")
    return CheckResult(name, True, f"{path} (private; QEMU gets its sockets as fds)")


def _vsock_check() -> CheckResult:
    if os.path.exists("/dev/vhost-vsock"):
        return CheckResult("vhost-vsock", True, "vsock guest channel available")
    return CheckResult("vhost-vsock", True, "no /dev/vhost-vsock: guest channel is virtio-serial")


__all__ = [
    "AdoptReport",
    "CheckResult",
    "EngineSettings",
    "MemorySaveResult",
    "Orphan",
    "UnprivilegedImpossible",
    "VmConfig",
    "VmEngine",
    "VmEvent",
    "VmState",
    "VmStatus",
]
