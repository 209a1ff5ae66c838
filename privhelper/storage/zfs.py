"""The ZFS backend: clones, snapshots and rollback done by ZFS itself.

See :mod:`.zfs_state` for the layout.  Volumes are zvols by default; where the
pool cannot make zvols (zfs-fuse) or ``zvols = false``, each volume is a
filesystem dataset holding a raw ``disk.img``: every other command path is the
same.  Needs ``zfs``/``zpool`` and ``qemu-img`` (to import bases).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import anyio
import structlog

from . import commands as cmd
from .config import ZfsConfig
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    CommandFailed,
    CorruptState,
    HasDependents,
    InvalidSize,
    NotFound,
    VolumeBusy,
)
from .locks import image_in_use
from .model import (
    Attachment,
    BaseInfo,
    BlockNode,
    FromBase,
    FromSnapshot,
    ImageFormat,
    Protocol,
    SnapshotDeletion,
    SnapshotInfo,
    SnapshotPlan,
    VolumeInfo,
    VolumeSource,
)
from .names import check_name, check_size
from .qemu_img import parse_info
from .quotas import check_reserve
from .runner import Runner
from .zfs_state import (
    BASE_SNAPSHOT,
    DISK_FILE,
    HIDDEN_PREFIX,
    PROPS,
    VSIZE_PROP,
    Datasets,
    Props,
    clones_of,
    int_prop,
    is_hidden,
    later_snapshot_dependents,
    parse_get,
    plan_promotion,
    snapshots_of,
)

log = structlog.get_logger("agentiso.helper.storage")

#: Every zvol (base, clone, probe): the host exposes it as one device only
#: and never scans the partition table its guest wrote (no kpartx/udev
#: parsing of guest data as root).
ZVOL_PROPS = {"volmode": "dev"}
#: Attempts of a zfs command failing with a transient "dataset is busy",
#: about 3 s in all (1 s was too short for zfs-fuse on a loaded host; a
#: QEMU holding the volume is refused before, by its image lock).
_BUSY_RETRIES = 10
#: How long a new zvol's device node may take to appear (udev).
_ZVOL_NODE_TIMEOUT_S = 10.0


def _is_busy(exc: CommandFailed) -> bool:
    return "busy" in exc.stderr.lower()


class ZfsBackend:
    """:class:`~.backend.VolumeBackend` on datasets below ``config.dataset``."""

    kind = "zfs"

    def __init__(
        self,
        config: ZfsConfig,
        *,
        runner: Runner | None = None,
        min_size: int = 1024 * 1024,
        max_size: int = 2 * 1024**4,
        zvol_dir: Path = Path("/dev/zvol"),
        reserve_free_bytes: int = 0,
    ) -> None:
        self.config = config
        #: Creates and snapshots are refused when the pool has less available.
        self.reserve_free_bytes = reserve_free_bytes
        self.ds = Datasets(config.dataset)
        self.runner = runner or Runner()
        self.min_size = min_size
        self.max_size = max_size
        self.zvol_dir = zvol_dir
        #: Decided by setup(): make new volumes/bases as zvols?
        self.zvols = bool(config.zvols)
        self.compression = config.compression
        # One mutation at a time: a dataset name is checked free and created
        # under it, and zfs metadata read-modify-write cycles never interleave.
        self._lock = anyio.Lock()

    # --- setup and queries ------------------------------------------------------------

    async def setup(self) -> None:
        res = await self.runner.run(cmd.zpool_list(self.ds.pool), check=False)
        if res.returncode != 0:
            raise BackendUnavailable(
                f"ZFS pool {self.ds.pool!r} is not available: {res.stderr.strip()[-300:]}"
            )
        if not await self._exists(self.ds.root):
            try:
                await self.runner.run(
                    cmd.zfs_create(self.ds.root, {"compression": self.compression}, parents=True)
                )
            except CommandFailed as exc:
                # zfs-fuse (pool version 23) predates lz4.
                if "compression" not in exc.stderr:
                    raise
                self.compression = self.config.compression_fallback
                await self.runner.run(
                    cmd.zfs_create(self.ds.root, {"compression": self.compression}, parents=True)
                )
        else:
            res = await self.runner.run(cmd.zfs_get([self.ds.root], ["compression"]))
            self.compression = parse_get(res.stdout)[self.ds.root]["compression"]
        for ds in (self.ds.images, self.ds.volumes):
            if not await self._exists(ds):
                await self.runner.run(cmd.zfs_create(ds))
        if self.config.zvols is False:
            self.zvols = False
        else:
            self.zvols = await self._probe_zvols()
            if self.config.zvols and not self.zvols:
                raise BackendUnavailable(
                    f"pool {self.ds.pool!r} cannot create zvols (zfs-fuse?): "
                    "set storage.zfs.zvols = false for file mode"
                )

    async def _probe_zvols(self) -> bool:
        """Can this pool make a zvol?  (zfs-fuse's ``zfs create -V`` aborts.)"""
        res = await self.runner.run(
            cmd.zfs_create_zvol(self.ds.probe, 1024 * 1024, ZVOL_PROPS), check=False
        )
        if await self._exists(self.ds.probe):
            await self.runner.run(cmd.zfs_destroy(self.ds.probe), check=False)
        return res.returncode == 0

    async def _check_reserve(self) -> None:
        """Refuse (``limit_exceeded``) below the reserve of the root's ``available``."""
        if self.reserve_free_bytes <= 0:
            return
        res = await self.runner.run(cmd.zfs_get([self.ds.root], ["available"]))
        value = parse_get(res.stdout).get(self.ds.root, {}).get("available", "")
        if not value.isdigit():
            # Not a byte count (an old zfs without -p?): never refuse on a guess.
            log.warning("zfs_available_unreadable", dataset=self.ds.root, value=value[:40])
            return
        check_reserve(int(value), self.reserve_free_bytes)

    async def _exists(self, dataset: str) -> bool:
        res = await self.runner.run(cmd.zfs_get([dataset], ["type"]), check=False)
        return res.returncode == 0

    async def _props(self) -> dict[str, dict[str, str]]:
        res = await self.runner.run(cmd.zfs_get([self.ds.root], PROPS, recursive=True))
        return parse_get(res.stdout)

    def _disk_path(self, props: Props, dataset: str) -> Path:
        mp = props[dataset].get("mountpoint", "-")
        if not mp.startswith("/"):
            raise BackendUnavailable(f"dataset {dataset!r} is not mounted (mountpoint={mp})")
        return Path(mp) / DISK_FILE

    def _node(self, props: Props, dataset: str, *, read_only: bool = False) -> BlockNode:
        if props[dataset].get("type") == "volume":
            return BlockNode(
                self.zvol_dir / dataset, ImageFormat.RAW, Protocol.HOST_DEVICE, read_only
            )
        return BlockNode(self._disk_path(props, dataset), ImageFormat.RAW, Protocol.FILE, read_only)

    def _virtual_size(self, props: Props, dataset: str) -> int:
        if props[dataset].get("type") == "volume":
            return int_prop(props, dataset, "volsize")
        try:
            return os.stat(self._disk_path(props, dataset)).st_size
        except FileNotFoundError:
            raise CorruptState(f"dataset {dataset!r} has no {DISK_FILE}") from None

    def _require_volume(self, props: Props, name: str) -> str:
        ds = self.ds.volume(name)
        if ds not in props:
            raise NotFound("volume", name)
        return ds

    def _require_snapshot(self, props: Props, volume: str, snapshot: str) -> str:
        self._require_volume(props, volume)
        full = self.ds.snapshot(volume, snapshot)
        if full not in props:
            raise NotFound("snapshot", f"{volume}@{snapshot}")
        return full

    def _info(self, props: Props, name: str) -> VolumeInfo:
        ds = self.ds.volume(name)
        snaps = tuple(
            SnapshotInfo(
                volume=name,
                name=s,
                virtual_size=int_prop(props, f"{ds}@{s}", VSIZE_PROP)
                or int_prop(props, f"{ds}@{s}", "volsize"),
                used_bytes=int_prop(props, f"{ds}@{s}", "used"),
                dependents=tuple(
                    n for c in clones_of(props, f"{ds}@{s}") if (n := self.ds.volume_name(c))
                ),
            )
            for s in snapshots_of(props, ds)
            if not is_hidden(s)
        )
        return VolumeInfo(
            name=name,
            virtual_size=self._virtual_size(props, ds),
            used_bytes=int_prop(props, ds, "used"),
            origin=self.ds.origin_label(props[ds].get("origin", "-")),
            snapshots=snaps,
        )

    def _zvol_size(self, size: int) -> int:
        """``size`` rounded up to the volblocksize (ZFS refuses other volsizes)."""
        block = self.config.volblocksize
        return -(-size // block) * block

    async def _wait_zvol(self, dataset: str) -> Path:
        node = self.zvol_dir / dataset
        # udev creates the node asynchronously; poll (no inotify on /dev/zvol here).
        for _ in range(int(_ZVOL_NODE_TIMEOUT_S / 0.05)):
            if node.exists():
                return node
            await anyio.sleep(0.05)
        raise BackendUnavailable(f"zvol device {node} did not appear")

    async def _run_unbusy(self, argv: list[str], volume: str, op: str) -> None:
        """Run a zfs command that fails "busy" while the kernel still holds the mount.

        Callers have checked that no QEMU holds the volume; what is left is a
        transient reference (zfs-fuse's FUSE mount settling), so retry briefly.
        """
        for attempt in range(_BUSY_RETRIES):
            try:
                await self.runner.run(argv)
                return
            except CommandFailed as exc:
                if not _is_busy(exc):
                    raise
                if attempt == _BUSY_RETRIES - 1:
                    raise VolumeBusy(volume, op) from None
                await anyio.sleep(min(0.4, 0.1 * (attempt + 1)))

    async def _destroy(self, target: str, *, recursive: bool, volume: str, op: str) -> None:
        await self._run_unbusy(cmd.zfs_destroy(target, recursive=recursive), volume, op)

    async def _forget(self, dataset: str) -> None:
        """Best-effort removal of a dataset this call just made (failure path)."""
        await self.runner.run(cmd.zfs_unmount(dataset), check=False)
        await self.runner.run(cmd.zfs_destroy(dataset, recursive=True), check=False)

    def _ensure_idle(self, props: Props, dataset: str, volume: str, op: str) -> None:
        """Refuse if a QEMU has the volume open (it holds QEMU's image locks)."""
        if image_in_use(self._node(props, dataset).path):
            raise VolumeBusy(volume, op)

    async def _destroy_volume_dataset(self, props: Props, dataset: str, volume: str) -> None:
        self._ensure_idle(props, dataset, volume, "destroy")
        await self._unmount(props, dataset, volume)
        await self._destroy(dataset, recursive=True, volume=volume, op="destroy")

    async def _unmount(self, props: Props, dataset: str, volume: str) -> None:
        if props[dataset].get("type") == "filesystem":
            # zfs-fuse's own unmount inside destroy races its fresh mounts
            # ("dataset is busy"); an explicit unmount first is reliable.
            await self._run_unbusy(cmd.zfs_unmount(dataset), volume, "destroy")

    # --- bases ----------------------------------------------------------------------

    async def import_base(self, name: str, source: Path) -> BaseInfo:
        check_name("base", name)
        async with self._lock:
            ds = self.ds.base(name)
            if await self._exists(ds):
                raise AlreadyExists("base", name)
            src = parse_info((await self.runner.run(cmd.qemu_img_info(Path(source)))).stdout)
            if src.format not in ("raw", "qcow2") or src.backing_filename:
                raise CorruptState(f"base source for {name!r} is not a standalone raw/qcow2 image")
            try:
                if self.zvols:
                    await self.runner.run(
                        cmd.zfs_create_zvol(
                            ds,
                            self._zvol_size(src.virtual_size),
                            {"volblocksize": str(self.config.volblocksize), **ZVOL_PROPS},
                        )
                    )
                    dev = await self._wait_zvol(ds)
                    await self.runner.run(
                        cmd.qemu_img_convert_to_device(Path(source), src.format, dev)
                    )
                else:
                    await self.runner.run(cmd.zfs_create(ds))
                    disk = self._disk_path(await self._props(), ds)
                    await self.runner.run(
                        cmd.qemu_img_convert(Path(source), src.format, disk, "raw")
                    )
                    # Clones inherit the file's mode: keep workspace disks private.
                    os.chmod(disk, 0o600)
                await self.runner.run(cmd.zfs_snapshot(ds, BASE_SNAPSHOT))
                await self.runner.run(
                    cmd.zfs_set(f"{ds}@{BASE_SNAPSHOT}", VSIZE_PROP, str(src.virtual_size))
                )
                await self.runner.run(cmd.zfs_set(ds, "readonly", "on"))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._forget(ds)
                raise
            props = await self._props()
            return BaseInfo(name, src.virtual_size, int_prop(props, ds, "used"))

    async def delete_base(self, name: str) -> None:
        check_name("base", name)
        async with self._lock:
            props = await self._props()
            ds = self.ds.base(name)
            if ds not in props:
                raise NotFound("base", name)
            deps = self._base_dependents(props, name)
            if deps:
                raise HasDependents("base", name, deps)
            await self._unmount(props, ds, name)
            await self._destroy(ds, recursive=True, volume=name, op="delete-base")

    def _base_dependents(self, props: Props, name: str) -> list[str]:
        clones = clones_of(props, self.ds.base_origin(name))
        return [n for c in clones if (n := self.ds.volume_name(c))]

    async def list_bases(self) -> list[BaseInfo]:
        props = await self._props()
        out = []
        for ds in props:
            name = self.ds.base_name(ds)
            if name is None:
                continue
            out.append(
                BaseInfo(
                    name,
                    int_prop(props, self.ds.base_origin(name), VSIZE_PROP),
                    int_prop(props, ds, "used"),
                    tuple(self._base_dependents(props, name)),
                )
            )
        return out

    # --- volumes --------------------------------------------------------------------

    async def create_volume(
        self, name: str, source: VolumeSource, size: int | None = None
    ) -> VolumeInfo:
        check_name("volume", name)
        if size is not None:
            check_size(size, minimum=self.min_size, maximum=self.max_size)
        async with self._lock:
            props = await self._props()
            ds = self.ds.volume(name)
            if ds in props:
                raise AlreadyExists("volume", name)
            await self._check_reserve()
            if isinstance(source, FromBase):
                check_name("base", source.base)
                origin = self.ds.base_origin(source.base)
                if origin not in props:
                    raise NotFound("base", source.base)
            elif isinstance(source, FromSnapshot):
                check_name("volume", source.volume)
                check_name("snapshot", source.snapshot)
                origin = self._require_snapshot(props, source.volume, source.snapshot)
            else:  # pragma: no cover - typing guards this
                raise TypeError(source)
            src_size = int_prop(props, origin, VSIZE_PROP) or int_prop(props, origin, "volsize")
            if size is not None and size < src_size:
                raise InvalidSize(size, f"smaller than its source ({src_size} bytes)")
            # A clone of a readonly base would inherit nothing from it (properties
            # come from the parent dataset), so the volume is writable.
            # A zvol clone gets volmode=dev too: never let the host parse
            # the partition table a guest wrote (no partition devices, no udev
            # probing); a file dataset knows no volmode.
            is_zvol = props[origin.partition("@")[0]].get("type") == "volume"
            await self.runner.run(cmd.zfs_clone(origin, ds, ZVOL_PROPS if is_zvol else None))
            try:
                props = await self._props()
                if props[ds].get("type") == "volume":
                    await self._wait_zvol(ds)  # udev makes the clone's node
                if size is not None and size > self._virtual_size(props, ds):
                    await self._resize(props, ds, size)
                    props = await self._props()
                return self._info(props, name)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._forget(ds)
                raise

    async def _resize(self, props: Props, dataset: str, size: int) -> None:
        if props[dataset].get("type") == "volume":
            await self.runner.run(cmd.zfs_set(dataset, "volsize", str(self._zvol_size(size))))
        else:
            os.truncate(self._disk_path(props, dataset), size)

    async def destroy_volume(self, name: str) -> None:
        check_name("volume", name)
        async with self._lock:
            props = await self._props()
            ds = self._require_volume(props, name)
            # Clones of this volume's snapshots outlive it: hand them the
            # snapshots they stand on (zfs promote), then destroy the rest.
            while (step := plan_promotion(props, ds)) is not None:
                for s in step.hide:
                    hidden = f"{HIDDEN_PREFIX}{secrets.token_hex(6)}"
                    await self.runner.run(cmd.zfs_rename(f"{ds}@{s}", f"{ds}@{hidden}"))
                await self.runner.run(cmd.zfs_promote(step.clone))
                props = await self._props()
            await self._destroy_volume_dataset(props, ds, name)
            await self._reap_hidden()

    async def _reap_hidden(self) -> None:
        """Destroy hidden snapshots nothing depends on any more."""
        props = await self._props()
        for full in list(props):
            ds, _, snap = full.partition("@")
            if snap and is_hidden(snap) and self.ds.volume_name(ds) and not clones_of(props, full):
                await self.runner.run(cmd.zfs_destroy(full), check=False)

    async def volume_info(self, name: str) -> VolumeInfo:
        check_name("volume", name)
        props = await self._props()
        self._require_volume(props, name)
        return self._info(props, name)

    async def list_volumes(self) -> list[VolumeInfo]:
        props = await self._props()
        return [self._info(props, n) for ds in props if (n := self.ds.volume_name(ds))]

    async def grow_volume(self, name: str, size: int) -> VolumeInfo:
        check_name("volume", name)
        check_size(size, minimum=self.min_size, maximum=self.max_size)
        async with self._lock:
            props = await self._props()
            ds = self._require_volume(props, name)
            current = self._virtual_size(props, ds)
            if size < current:
                raise InvalidSize(size, f"volumes only grow (now {current} bytes)")
            if size > current:
                self._ensure_idle(props, ds, name, "grow")
                await self._resize(props, ds, size)
                props = await self._props()
            return self._info(props, name)

    async def attachment(self, name: str) -> Attachment:
        check_name("volume", name)
        props = await self._props()
        ds = self._require_volume(props, name)
        return Attachment(name, (self._node(props, ds),), self._virtual_size(props, ds))

    # --- snapshots ------------------------------------------------------------------

    async def prepare_snapshot(self, volume: str, snapshot: str) -> SnapshotPlan:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        props = await self._props()
        ds = self._require_volume(props, volume)
        if self.ds.snapshot(volume, snapshot) in props:
            raise AlreadyExists("snapshot", f"{volume}@{snapshot}")
        await self._check_reserve()
        # ZFS snapshots atomically under a running VM: nothing for QEMU to switch.
        return SnapshotPlan(volume, snapshot, None, self._node(props, ds))

    async def commit_snapshot(self, plan: SnapshotPlan) -> SnapshotInfo:
        check_name("volume", plan.volume)
        check_name("snapshot", plan.snapshot)
        async with self._lock:
            props = await self._props()
            ds = self._require_volume(props, plan.volume)
            full = self.ds.snapshot(plan.volume, plan.snapshot)
            if full in props:
                raise AlreadyExists("snapshot", f"{plan.volume}@{plan.snapshot}")
            size = self._virtual_size(props, ds)
            await self.runner.run(cmd.zfs_snapshot(ds, plan.snapshot))
            await self.runner.run(cmd.zfs_set(full, VSIZE_PROP, str(size)))
            props = await self._props()
            return SnapshotInfo(plan.volume, plan.snapshot, size, int_prop(props, full, "used"))

    async def abort_snapshot(self, plan: SnapshotPlan) -> None:
        # prepare_snapshot created nothing.
        return None

    async def snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        return await self.commit_snapshot(await self.prepare_snapshot(volume, snapshot))

    async def rollback(self, volume: str, snapshot: str) -> VolumeInfo:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        async with self._lock:
            props = await self._props()
            self._require_snapshot(props, volume, snapshot)
            ds = self.ds.volume(volume)
            deps = [
                n
                for c in later_snapshot_dependents(props, ds, snapshot)
                if (n := self.ds.volume_name(c))
            ]
            if deps:
                raise HasDependents("later snapshots of", f"{volume}@{snapshot}", deps)
            self._ensure_idle(props, ds, volume, "rollback")
            await self._run_unbusy(
                cmd.zfs_rollback(ds, snapshot, destroy_later=True), volume, "rollback"
            )
            return self._info(await self._props(), volume)

    async def delete_snapshot(self, volume: str, snapshot: str) -> None:
        await self.commit_delete_snapshot(await self.prepare_delete_snapshot(volume, snapshot))

    async def prepare_delete_snapshot(self, volume: str, snapshot: str) -> SnapshotDeletion:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        props = await self._props()
        self._check_deletable(props, volume, snapshot)
        # ZFS frees a snapshot under a running VM: nothing for QEMU to do.
        return SnapshotDeletion(volume, snapshot)

    async def commit_delete_snapshot(
        self, plan: SnapshotDeletion, *, streamed: bool = False
    ) -> None:
        check_name("volume", plan.volume)
        check_name("snapshot", plan.snapshot)
        async with self._lock:
            full = self._check_deletable(await self._props(), plan.volume, plan.snapshot)
            await self._destroy(full, recursive=False, volume=plan.volume, op="delete-snapshot")

    def _check_deletable(self, props: Props, volume: str, snapshot: str) -> str:
        full = self._require_snapshot(props, volume, snapshot)
        deps = [n for c in clones_of(props, full) if (n := self.ds.volume_name(c))]
        if deps:
            raise HasDependents("snapshot", f"{volume}@{snapshot}", deps)
        return full

    # --- maintenance ----------------------------------------------------------------

    async def collect_garbage(self, *, dry_run: bool = True) -> list[str]:
        async with self._lock:
            props = await self._props()
            found = [
                full
                for full in props
                if (ds := full.partition("@"))[2]
                and is_hidden(ds[2])
                and self.ds.volume_name(ds[0])
                and not clones_of(props, full)
            ]
            if self.ds.probe in props:
                found.append(self.ds.probe)
            if not dry_run:
                for target in found:
                    await self.runner.run(cmd.zfs_destroy(target), check=False)
            return [f"dataset {name}" for name in found]
