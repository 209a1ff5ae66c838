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

The engine keeps one :class:`~.supervisor.VmSupervisor` per VM (process,
QMP, console, state); its runtime facts are persisted in a
:class:`~..record.VmRecord` so adoption works after ``kill -9`` of the helper.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import accel as accel_mod
from ..boundedlog import tail
from ..cmdline import NET_DEVICE
from ..errors import (
    LaunchError,
    VmAlreadyExists,
    VmError,
    VmNotFound,
    VmStateConflict,
    VmTimeout,
    VmUnavailable,
)
from ..procfs import read_host_tsc_khz, uids_in_use
from ..record import RecordStore, VmRecord
from ..spec import check_name
from ..uids import UidRange, allocate_uid, uid_unassigned
from . import adoption, hostcheck, launcher, snapshots
from .cgroups import VmCgroups, limits_for
from .kvmacl import KvmAcl
from .supervisor import VmSupervisor
from .types import (
    FINISHED,
    MIB,
    AdoptReport,
    AgentShutdown,
    CheckResult,
    EngineSettings,
    MemorySaveResult,
    Orphan,
    VmConfig,
    VmEvent,
    VmState,
    VmStatus,
)

log = structlog.get_logger("agentiso.helper.vm")


class VmEngine:
    def __init__(self, settings: EngineSettings, task_group: TaskGroup) -> None:
        self.settings = settings
        self._tg = task_group
        self._vms: dict[str, VmSupervisor] = {}
        self._uids = UidRange(settings.uid_base, settings.uid_count)
        base = Path(settings.state_dir) / "vm"
        self._records = RecordStore(base / "records")
        self._logs = base / "logs"
        self._run = Path(settings.run_dir)
        #: Marks the QEMUs this engine (this run dir) starts; see find_orphans.
        self._tag = hashlib.sha256(str(self._run.resolve()).encode()).hexdigest()[:16]
        self._cgroups_found = VmCgroups({})
        #: /dev/kvm's ACL: per-uid entries when the decision says so.
        self._kvm_acl = KvmAcl()
        #: uids holding an entry now (their QEMU is starting).
        self._kvm_granted: set[int] = set()
        self._cgroups_warned = False
        self._accel: accel_mod.AccelDecision | None = None
        #: Protects ``_accel``: the accelerator is decided (a probe boot) once.
        self._accel_lock = anyio.Lock()
        self._subscribers: list[MemoryObjectSendStream[VmEvent]] = []
        self._tsc_khz = read_host_tsc_khz()
        #: Names being started.  No lock: checked and added with no await in
        #: between, so a second start of one name is refused, never interleaved.
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
            await vm.detach()
        for s in self._subscribers:
            s.close()
        self._subscribers.clear()

    def subscribe(self, buffer: int = 64) -> MemoryObjectReceiveStream[VmEvent]:
        """A stream of :class:`VmEvent` (a VM ended).  Slow readers lose events."""
        send, recv = anyio.create_memory_object_stream[VmEvent](buffer)
        self._subscribers.append(send)
        return recv

    def _publish(self, event: VmEvent) -> None:
        for s in list(self._subscribers):
            try:
                s.send_nowait(event)
            except anyio.WouldBlock:
                pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(s)

    def _supervisor(
        self, record: VmRecord, *, adopted: bool, popen: Any = None, pidfd: int = -1
    ) -> VmSupervisor:
        return VmSupervisor(
            record, self.settings, adopted=adopted, popen=popen, pidfd=pidfd,
            publish=self._publish,
        )

    # --- accelerator -------------------------------------------------------------------

    async def probe_accelerator(self, kernel: str) -> accel_mod.AccelDecision:
        """KVM or TCG, decided once per engine (see :mod:`..accel`)."""
        async with self._accel_lock:
            if self._accel is None:
                self._accel = await hostcheck.decide_accelerator(
                    self.settings, self._uids, kernel, self._kvm_acl
                )
                log.info("accelerator", kind=self._accel.kind, reason=self._accel.reason)
            return self._accel

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
            uid = allocate_uid(self._uids, self._taken_uids(), uid_unassigned)
            gid = decision.kvm_gid if decision.kind == "kvm" and decision.kvm_gid else uid
        else:
            uid, gid = os.geteuid(), os.getegid()
            log.warning("qemu_runs_as_helper_uid", uid=uid, reason="the helper is not root")
        where = launcher.Placement(
            run=self._run / cfg.name, logs=self._logs / cfg.name, uid=uid, gid=gid,
            accel=decision, tsc_khz=self._tsc_khz, engine_tag=self._tag,
        )
        per_uid_kvm = decision.kind == "kvm" and self._kvm_acl.per_uid and os.geteuid() == 0
        if per_uid_kvm:
            # QEMU opens /dev/kvm during its start-up, before it serves QMP:
            # the entry goes once attach() has connected (or the start failed).
            try:
                self._kvm_acl.grant(uid)
            except OSError as exc:
                raise VmUnavailable(
                    f"cannot give VM uid {uid} access to /dev/kvm ({exc}); "
                    "check the device's ACL support, or set [vm] accel = \"tcg\""
                ) from None
            self._kvm_granted.add(uid)
        try:
            popen, record = launcher.spawn(cfg, self.settings, where)
        except BaseException:
            if per_uid_kvm:
                self._revoke_kvm(uid)
            raise
        vm = self._supervisor(record, adopted=False, popen=popen, pidfd=os.pidfd_open(popen.pid))
        self._vms[cfg.name] = vm
        self._records.save(record)
        log.info("vm_spawned", vm=cfg.name, pid=popen.pid, uid=uid, accel=decision.kind)
        try:
            cgroups = self._cgroups()
            if cgroups.available:
                limits = limits_for(
                    cfg.vcpus, cfg.memory_mib,
                    tb_size_mib=self.settings.tb_size_mib if decision.kind == "tcg" else 0,
                    overhead_mib=self.settings.cgroup_overhead_mib,
                    pids_max=self.settings.cgroup_pids_max,
                )
                cgroups.place(cfg.name, popen.pid, limits)
            try:
                await vm.attach(self._tg, self.settings.start_timeout_s)
            finally:
                if per_uid_kvm:
                    self._revoke_kvm(uid)
            if cfg.incoming_fd is not None:
                await snapshots.restore_memory(
                    vm, cfg.incoming_fd, self.settings.incoming_timeout_s
                )
            if cfg.net_link_down and cfg.net is not None:
                await vm.execute("set_link", {"name": NET_DEVICE, "up": False})
            await vm.execute("cont")
            vm.transition(VmState.RUNNING, only_from=(VmState.STARTING, VmState.PAUSED))
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                vm.begin_stop("start failed")
                vm.signal(signal.SIGKILL)
                with anyio.move_on_after(5):
                    await vm.exited.wait()
            stderr = self.stderr_tail(cfg.name, 1024).decode(errors="replace").strip()
            if vm.exited.is_set():
                self.forget(cfg.name)  # a failed start leaves nothing behind
            if isinstance(exc, VmError):
                raise LaunchError(
                    f"VM {cfg.name} failed to start: {exc.message}; QEMU said: {stderr}"
                ) from None
            raise
        return vm.status()

    # --- queries -------------------------------------------------------------------------

    def _get(self, name: str) -> VmSupervisor:
        vm = self._vms.get(name)
        if vm is None:
            raise VmNotFound(f"no VM named {name!r}")
        return vm

    def _alive(self, name: str, to: str) -> VmSupervisor:
        vm = self._get(name)
        vm.require_alive(to=to)
        return vm

    def names(self) -> list[str]:
        return sorted(self._vms)

    def status(self, name: str) -> VmStatus:
        return self._get(name).status()

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

    async def qmp(
        self, name: str, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command on a live VM (for the server's own use, never a client's)."""
        return await self._alive(name, f"run {cmd}").execute(cmd, args, timeout)

    async def query_status(self, name: str) -> str:
        info = await self.qmp(name, "query-status")
        return str(info.get("status")) if isinstance(info, dict) else "unknown"

    # --- control -----------------------------------------------------------------------

    async def pause(self, name: str) -> None:
        vm = self._get(name)
        vm.require(VmState.RUNNING, VmState.PAUSED, to="pause")
        await vm.execute("stop")
        vm.transition(VmState.PAUSED, only_from=(VmState.RUNNING,))

    async def set_link(self, name: str, up: bool) -> None:
        """Set the link of the VM's NIC (the netdev and the guest's NIC) up or down."""
        await self._alive(name, "set its link").execute("set_link", {"name": NET_DEVICE, "up": up})

    async def resume(self, name: str) -> None:
        vm = self._get(name)
        vm.require(VmState.RUNNING, VmState.PAUSED, to="resume")
        await vm.execute("cont")
        vm.transition(VmState.RUNNING, only_from=(VmState.PAUSED,))

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
            return vm.status()
        # A paused guest can neither answer its agent nor see the power button.
        paused = vm.state == VmState.PAUSED
        vm.begin_stop("stop")
        vm.transition(VmState.STOPPING)
        log.info("vm_stopping", vm=name, paused=paused)
        steps: list[tuple[str, float]] = []
        if agent_shutdown is not None and not paused:
            steps.append(("agent shutdown", agent_timeout))
        if not paused:
            steps.append(("ACPI powerdown", powerdown_timeout))
        steps += [("QMP quit", 3.0), ("SIGKILL", kill_timeout)]
        for method, timeout in steps:
            vm.begin_stop(method)
            with anyio.move_on_after(timeout):
                try:
                    if method == "agent shutdown" and agent_shutdown is not None:
                        await agent_shutdown()
                    elif method == "ACPI powerdown":
                        await vm.execute("system_powerdown", timeout=timeout)
                    elif method == "QMP quit":
                        await vm.execute("quit", timeout=timeout)
                    else:
                        vm.signal(signal.SIGKILL)
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
        return vm.status()

    async def kill(self, name: str, timeout: float = 5.0) -> VmStatus:
        """SIGKILL QEMU now (a deliberate stop: the state becomes STOPPED)."""
        vm = self._get(name)
        if not vm.exited.is_set():
            vm.begin_stop("kill")
            vm.signal(signal.SIGKILL)
            with anyio.move_on_after(timeout):
                await vm.exited.wait()
            if not vm.exited.is_set():
                raise VmTimeout(f"VM {name} survived SIGKILL")
        return vm.status()

    def forget(self, name: str) -> None:
        """Drop an ended VM: its record, run directory and logs."""
        vm = self._get(name)
        if not vm.exited.is_set():
            raise VmStateConflict(f"VM {name} is still {vm.state}")
        self._records.delete(name)
        self._cgroups().remove(name)
        shutil.rmtree(vm.record.run_dir, ignore_errors=True)
        shutil.rmtree(Path(vm.record.console_log).parent, ignore_errors=True)
        del self._vms[name]

    # --- memory snapshots and live disk snapshots --------------------------------------

    async def save_memory(self, name: str, fd: int, timeout: float = 300.0) -> MemorySaveResult:
        """Pause the VM and write its whole state to ``fd`` (a file the caller opened).

        The VM stays paused afterwards so the caller can snapshot the disk in
        the same instant; then :meth:`resume` it or :meth:`stop` it.  The file
        restarts the VM with ``VmConfig(incoming_fd=...)`` and the same spec.
        """
        return await snapshots.save_memory(self._get(name), fd, timeout)

    async def switch_to_overlay(
        self, name: str, path: str, fmt: Literal["qcow2"] = "qcow2", timeout: float = 30.0
    ) -> str:
        """Make a running VM write to a new top layer ``path`` (a live disk snapshot).

        ``path`` is an existing qcow2 whose backing is the current top (the
        storage layer made it).  The record's chain and top node are updated
        so adoption and restarts see the new chain.  Returns the new top
        node's name.  Pause or freeze the guest around it for consistency.
        """
        vm = self._get(name)
        vm.record = await snapshots.switch_to_overlay(vm, path, fmt, timeout)
        self._records.save(vm.record)
        return vm.record.top_node

    # --- adoption and orphans --------------------------------------------------------------

    async def adopt_all(self) -> AdoptReport:
        """Re-attach to every recorded QEMU still alive; report the dead ones."""
        records, bad = self._records.load_all()
        adopted: list[str] = []
        dead: list[VmStatus] = []
        for rec in records:
            if rec.name in self._vms:
                continue
            pidfd = adoption.open_recorded(rec)
            vm = self._supervisor(rec, adopted=True, pidfd=pidfd)
            self._vms[rec.name] = vm
            if pidfd < 0:
                vm.mark_dead(adoption.DEAD_REASON)
                dead.append(vm.status())
                continue
            try:
                await vm.attach(self._tg, timeout=self.settings.qmp_timeout_s)
                qstatus = await vm.execute("query-status")
                running = isinstance(qstatus, dict) and qstatus.get("running") is True
                vm.transition(VmState.RUNNING if running else VmState.PAUSED)
                adopted.append(rec.name)
                log.info("vm_adopted", vm=rec.name, pid=rec.pid)
            except VmError as e:
                if vm.exited.is_set():  # it died while we were attaching
                    dead.append(vm.status())
                    continue
                # Alive but QMP unreachable: keep watching it (death is still seen,
                # kill works, QMP reconnects on the next call) and keep its console.
                vm.transition(VmState.RUNNING)
                vm.follow_console()
                adopted.append(rec.name)
                log.warning("vm_adopted_without_qmp", vm=rec.name, error=e.message)
        # Cgroups of VMs that ended while no helper ran (kept for the live ones).
        self._cgroups().gc(set(self._vms))
        self._revoke_stale_kvm_entries()
        return AdoptReport(adopted=adopted, dead=dead, unreadable=bad)

    def cgroup_usage(self, name: str) -> dict[str, int] | None:
        """VM ``name``'s cgroup figures (memory, CPU throttling, tasks); None
        where VMs run without cgroups."""
        self._get(name)
        cgroups = self._cgroups()
        return cgroups.usage(name) if cgroups.available else None

    def _revoke_kvm(self, uid: int) -> None:
        self._kvm_granted.discard(uid)
        try:
            self._kvm_acl.revoke(uid)
        except OSError as exc:  # the next start's gc retries
            log.warning("kvm_acl_revoke_failed", uid=uid, error=str(exc))

    def _revoke_stale_kvm_entries(self) -> None:
        """/dev/kvm ACL entries of range uids a helper that died mid-start
        left behind (none are needed once QEMUs have opened the device)."""
        if os.geteuid() != 0 or not self._kvm_acl.supported():
            return
        rng = range(self._uids.base, self._uids.base + self._uids.count)
        try:
            stale = self._kvm_acl.revoke_stale(rng, keep=set(self._kvm_granted))
        except OSError as exc:
            log.warning("kvm_acl_gc_failed", error=str(exc))
            return
        if stale:
            log.info("kvm_acl_stale_entries_removed", uids=stale)

    def _cgroups(self) -> VmCgroups:
        """The host's cgroups for VMs, looked for again until found (cheap:
        two small /proc reads) -- cgroupfs may be mounted after we start."""
        if self.settings.cgroup_limits and not self._cgroups_found.available:
            self._cgroups_found = VmCgroups.detect(self._tag)
            if not self._cgroups_found.available and not self._cgroups_warned:
                self._cgroups_warned = True
                log.warning("vm_cgroups_unavailable",
                            reason="no writable cgroup v1 cpu, memory and pids hierarchies: "
                                   "VMs run without CPU and memory limits")
        return self._cgroups_found

    def _watched_pids(self) -> set[int]:
        return {v.record.pid for v in self._vms.values() if not v.exited.is_set()}

    def find_orphans(self) -> list[Orphan]:
        """QEMU processes this engine started (in its run dir) that it does
        not know.  Another helper's QEMUs are never this engine's orphans."""
        return adoption.find_orphans(self._watched_pids(), self._tag)

    def kill_orphan(self, orphan: Orphan) -> bool:
        """SIGKILL an orphan if the pid still is that QEMU; True if signalled."""
        return adoption.kill_orphan(orphan, self._watched_pids())

    # --- diagnostics ---------------------------------------------------------------------

    async def check(self, kernel: str | None = None) -> list[CheckResult]:
        """Facts for ``agentiso-helper check``: can VMs run here, and how."""
        decision: accel_mod.AccelDecision | VmError | None = None
        if kernel is not None:
            try:
                decision = await self.probe_accelerator(kernel)
            except VmError as e:
                decision = e
        return await hostcheck.host_checks(self.settings, self._uids, self._run, decision)
