"""The qcow2 backend: chains of qcow2 overlays over imported bases.

See :mod:`.qcow2_state` for the layout and the snapshot model; this module is
the I/O around it (qemu-img, files, atomic metadata).  Needs only ``qemu-img``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import anyio
import msgspec
import structlog

from ..atomicfile import atomic_write, fsync_dir
from . import commands as cmd
from . import sandbox
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    CommandFailed,
    CorruptState,
    HasDependents,
    InvalidSize,
    NotFound,
    VolumeBusy,
    VolumeMerging,
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
from .qcow2_header import check_layer, read_header
from .qcow2_state import (
    LAYER_ID,
    METADATA_VERSION,
    Layout,
    SnapshotRecord,
    VolumeMeta,
    base_dependents,
    decode_meta,
    deletion_token,
    describe_deletion,
    encode_meta,
    layer_users,
    next_seq,
    owned_layers,
    plan_delete_snapshot,
    plan_rollback,
    snapshot_dependents,
    unreferenced,
)
from .qemu_img import is_lock_error, parse_info
from .quotas import check_reserve, free_bytes
from .runner import Runner

log = structlog.get_logger("agentiso.helper.storage")

#: Frozen layers and bases are never written again; the top is QEMU's.
_FROZEN_MODE = 0o400
_TOP_MODE = 0o600


def _allocated(path: Path) -> int:
    """Bytes the file really occupies on disk (sparse-aware)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _new_layer_id() -> str:
    return secrets.token_hex(12)


class Qcow2Backend:
    """:class:`~.backend.VolumeBackend` on qcow2 files under ``root``."""

    kind = "qcow2"

    def __init__(
        self,
        root: Path,
        *,
        runner: Runner | None = None,
        min_size: int = 1024 * 1024,
        max_size: int = 2 * 1024**4,
        reserve_free_bytes: int = 0,
    ) -> None:
        self.layout = Layout(Path(root).absolute())
        #: Creates and snapshots are refused when the filesystem has less free.
        self.reserve_free_bytes = reserve_free_bytes
        self.runner = runner or Runner()
        self.min_size = min_size
        self.max_size = max_size
        # One mutation at a time: a name is checked free and its file created
        # under it, and metadata read-modify-write cycles never interleave.
        self._lock = anyio.Lock()
        # Layers made by prepare_snapshot and not yet committed or aborted: not garbage.
        self._pending: set[str] = set()
        # Volumes whose snapshot merge runs without the lock (see
        # commit_delete_snapshot): every other operation on them is refused.
        self._merging: set[str] = set()
        self._warned_unconfined = False

    # --- helpers ------------------------------------------------------------------

    async def setup(self) -> None:
        for d in (self.layout.root, *self.layout.dirs()):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            await self.runner.run([cmd.QEMU_IMG, "--version"])
        except CommandFailed as exc:
            raise BackendUnavailable(f"qemu-img does not work: {exc.stderr.strip()}") from None
        # Leftovers of an interrupted build are never referenced: drop them.
        for p in self.layout.tmp.iterdir():
            p.unlink(missing_ok=True)

    def _load(self, volume: str) -> VolumeMeta:
        path = self.layout.meta(volume)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound("volume", volume) from None
        meta = decode_meta(data, path.name)
        if meta.name != volume:
            raise CorruptState(f"{path.name}: records volume {meta.name!r}")
        return meta

    def _load_all(self) -> list[VolumeMeta]:
        metas = []
        for p in sorted(self.layout.volumes.glob("*.json")):
            metas.append(decode_meta(p.read_bytes(), p.name))
        return metas

    def _store(self, meta: VolumeMeta) -> None:
        """Write metadata atomically (temp file, fsync, rename, fsync dir)."""
        atomic_write(self.layout.meta(meta.name), encode_meta(meta))

    async def _run(self, argv: list[str], volume: str, operation: str) -> None:
        """Run a qemu-img command that needs the image unlocked."""
        try:
            await self.runner.run(argv)
        except CommandFailed as exc:
            if is_lock_error(exc.stderr):
                raise VolumeBusy(volume, operation) from None
            raise

    async def _run_confined(
        self, argv: list[str], *, ro: list[Path], rw: list[Path], volume: str, operation: str
    ) -> None:
        """:meth:`_run` a qemu-img on guest-written layers, allowed to open only
        ``ro`` and ``rw`` (Landlock, see :mod:`.sandbox`) where the kernel can."""
        if sandbox.available():
            argv = sandbox.wrap(argv, ro=ro, rw=rw)
        elif not self._warned_unconfined:
            self._warned_unconfined = True
            log.warning("qemu_img_unconfined", reason="Landlock is not available on this kernel")
        await self._run(argv, volume, operation)

    def _refuse_merging(self, volume: str, operation: str) -> None:
        if volume in self._merging:
            raise VolumeMerging(volume, operation)

    def _ensure_idle(self, meta: VolumeMeta, operation: str) -> None:
        """Refuse if a QEMU has the volume's top open (it holds QEMU's image locks)."""
        if image_in_use(self.layout.layer(meta.top)):
            raise VolumeBusy(meta.name, operation)

    async def _make_overlay(self, backing: Path, size: int) -> str:
        """Create a new empty top over ``backing`` and return its layer id."""
        layer = _new_layer_id()
        tmp = self.layout.tmp / f"{layer}.qcow2"
        await self.runner.run(cmd.qemu_img_create_overlay(tmp, backing, "qcow2", size))
        os.chmod(tmp, _TOP_MODE)
        os.replace(tmp, self.layout.layer(layer))
        return layer

    def _chain_paths(self, meta: VolumeMeta, index: int) -> list[Path]:
        """``chain[index]`` (-1: the base) and everything below it, top first."""
        below = [self.layout.layer(lay) for lay in reversed(meta.chain[: index + 1])]
        return [*below, self.layout.base(meta.base)]

    def _verify_chain(self, meta: VolumeMeta) -> None:
        """Every layer's header must be what the helper wrote (see
        :mod:`.qcow2_header`) before root runs qemu-img on the chain."""
        what = "a layer of this volume"
        for i, lay in enumerate(meta.chain):
            check_layer(read_header(self.layout.layer(lay)), self.layout.backing_of(meta, i), what)
        check_layer(read_header(self.layout.base(meta.base)), None, "the volume's base image")

    def _freeze(self, layer: str) -> None:
        os.chmod(self.layout.layer(layer), _FROZEN_MODE)

    def _delete_layers(self, layers: list[str] | tuple[str, ...]) -> None:
        for layer in unreferenced(layers, self._load_all()):
            self.layout.layer(layer).unlink(missing_ok=True)

    def _check_reserve(self, need: int = 0) -> None:
        check_reserve(free_bytes(self.layout.root), self.reserve_free_bytes, need)

    def _check_size(self, size: int) -> int:
        return check_size(size, minimum=self.min_size, maximum=self.max_size)

    async def _virtual_size(self, path: Path) -> int:
        res = await self.runner.run(cmd.qemu_img_info(path))
        return parse_info(res.stdout).virtual_size

    def _info(self, meta: VolumeMeta, metas: list[VolumeMeta]) -> VolumeInfo:
        users = layer_users(metas)
        owned = owned_layers(meta, users)
        snaps = tuple(
            SnapshotInfo(
                volume=meta.name,
                name=s.name,
                virtual_size=s.virtual_size,
                used_bytes=_allocated(self.layout.layer(s.layer)),
                dependents=tuple(snapshot_dependents(meta, s.name, metas)),
            )
            for s in meta.snapshots
        )
        return VolumeInfo(
            name=meta.name,
            virtual_size=meta.virtual_size,
            used_bytes=sum(_allocated(self.layout.layer(lay)) for lay in owned),
            origin=meta.origin,
            snapshots=snaps,
        )

    # --- bases ----------------------------------------------------------------------

    async def import_base(self, name: str, source: Path) -> BaseInfo:
        check_name("base", name)
        async with self._lock:
            dest = self.layout.base(name)
            if dest.exists():
                raise AlreadyExists("base", name)
            src = parse_info((await self.runner.run(cmd.qemu_img_info(Path(source)))).stdout)
            if src.format not in ("raw", "qcow2"):
                raise CorruptState(f"base source for {name!r} is {src.format}, not raw or qcow2")
            if src.backing_filename:
                raise CorruptState(f"base source for {name!r} has a backing file")
            # The copy takes about what the source occupies.
            self._check_reserve(need=_allocated(Path(source)))
            tmp = self.layout.tmp / f"base-{name}-{secrets.token_hex(4)}.qcow2"
            try:
                await self.runner.run(cmd.qemu_img_convert(Path(source), src.format, tmp, "qcow2"))
                # Every volume will stand on this file: verify it before it is published.
                await self.runner.run(cmd.qemu_img_check(tmp))
                os.chmod(tmp, _FROZEN_MODE)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(dest.parent)
            return BaseInfo(name, src.virtual_size, _allocated(dest))

    async def delete_base(self, name: str) -> None:
        check_name("base", name)
        async with self._lock:
            path = self.layout.base(name)
            if not path.exists():
                raise NotFound("base", name)
            deps = base_dependents(name, self._load_all())
            if deps:
                raise HasDependents("base", name, deps)
            path.unlink()

    async def list_bases(self) -> list[BaseInfo]:
        metas = self._load_all()
        out = []
        for p in sorted(self.layout.images.glob("*.qcow2")):
            name = p.name.removesuffix(".qcow2")
            out.append(
                BaseInfo(
                    name,
                    await self._virtual_size(p),
                    _allocated(p),
                    tuple(base_dependents(name, metas)),
                )
            )
        return out

    # --- volumes --------------------------------------------------------------------

    async def create_volume(
        self, name: str, source: VolumeSource, size: int | None = None
    ) -> VolumeInfo:
        check_name("volume", name)
        if size is not None:
            self._check_size(size)
        async with self._lock:
            if self.layout.meta(name).exists():
                raise AlreadyExists("volume", name)
            self._check_reserve()
            metas = self._load_all()
            if isinstance(source, FromBase):
                check_name("base", source.base)
                base_path = self.layout.base(source.base)
                if not base_path.exists():
                    raise NotFound("base", source.base)
                backing, prefix, base = base_path, [], source.base
                src_size = await self._virtual_size(base_path)
                origin = f"base:{source.base}"
            elif isinstance(source, FromSnapshot):
                check_name("volume", source.volume)
                check_name("snapshot", source.snapshot)
                self._refuse_merging(source.volume, "clone")
                parent = self._load(source.volume)
                snap = parent.snapshot(source.snapshot)
                idx = parent.chain.index(snap.layer)
                backing, prefix, base = (
                    self.layout.layer(snap.layer),
                    parent.chain[: idx + 1],
                    parent.base,
                )
                src_size = snap.virtual_size
                origin = f"snapshot:{source.volume}@{source.snapshot}"
            else:  # pragma: no cover - typing guards this
                raise TypeError(source)
            if size is not None and size < src_size:
                raise InvalidSize(size, f"smaller than its source ({src_size} bytes)")
            vsize = size if size is not None else src_size
            top = await self._make_overlay(backing, vsize)
            meta = VolumeMeta(
                version=METADATA_VERSION,
                name=name,
                base=base,
                origin=origin,
                seq=next_seq(metas),
                virtual_size=vsize,
                chain=[*prefix, top],
            )
            try:
                self._store(meta)
            except BaseException:
                self.layout.layer(top).unlink(missing_ok=True)
                raise
            return self._info(meta, [*metas, meta])

    async def destroy_volume(self, name: str) -> None:
        check_name("volume", name)
        async with self._lock:
            self._refuse_merging(name, "destroy")
            meta = self._load(name)
            self._ensure_idle(meta, "destroy")
            self.layout.meta(name).unlink()
            fsync_dir(self.layout.volumes)
            # Layers that clones still use stay; the oldest clone now owns them.
            self._delete_layers(meta.chain)

    async def volume_info(self, name: str) -> VolumeInfo:
        check_name("volume", name)
        meta = self._load(name)
        return self._info(meta, self._load_all())

    async def list_volumes(self) -> list[VolumeInfo]:
        metas = self._load_all()
        return [self._info(m, metas) for m in metas]

    async def grow_volume(self, name: str, size: int) -> VolumeInfo:
        check_name("volume", name)
        self._check_size(size)
        async with self._lock:
            self._refuse_merging(name, "grow")
            meta = self._load(name)
            if size < meta.virtual_size:
                raise InvalidSize(size, f"volumes only grow (now {meta.virtual_size} bytes)")
            if size > meta.virtual_size:
                self._ensure_idle(meta, "grow")
                self._verify_chain(meta)
                chain = self._chain_paths(meta, len(meta.chain) - 1)
                await self._run_confined(
                    cmd.qemu_img_resize_pinned(chain, size), ro=chain[1:], rw=chain[:1],
                    volume=name, operation="grow",
                )
                meta = msgspec.structs.replace(meta, virtual_size=size)
                self._store(meta)
            return self._info(meta, self._load_all())

    async def attachment(self, name: str) -> Attachment:
        check_name("volume", name)
        self._refuse_merging(name, "attach")
        meta = self._load(name)
        nodes = [
            BlockNode(self.layout.layer(lay), ImageFormat.QCOW2, Protocol.FILE, read_only=i > 0)
            for i, lay in enumerate(reversed(meta.chain))
        ]
        nodes.append(
            BlockNode(self.layout.base(meta.base), ImageFormat.QCOW2, Protocol.FILE, read_only=True)
        )
        return Attachment(name, tuple(nodes), meta.virtual_size)

    # --- snapshots ------------------------------------------------------------------

    async def prepare_snapshot(self, volume: str, snapshot: str) -> SnapshotPlan:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        async with self._lock:
            self._refuse_merging(volume, "snapshot")
            meta = self._load(volume)
            if any(s.name == snapshot for s in meta.snapshots):
                raise AlreadyExists("snapshot", f"{volume}@{snapshot}")
            self._check_reserve()
            current = self.layout.layer(meta.top)
            new = await self._make_overlay(current, meta.virtual_size)
            self._pending.add(new)
            return SnapshotPlan(
                volume=volume,
                snapshot=snapshot,
                new_top=BlockNode(self.layout.layer(new), ImageFormat.QCOW2, Protocol.FILE, False),
                current_top=BlockNode(current, ImageFormat.QCOW2, Protocol.FILE, False),
                token=f"{meta.top}:{new}",
            )

    def _plan_layers(self, plan: SnapshotPlan) -> tuple[str, str]:
        old, _, new = plan.token.partition(":")
        # The ids become file names: only what _new_layer_id() makes is accepted.
        if not (LAYER_ID.fullmatch(old) and LAYER_ID.fullmatch(new)):
            raise CorruptState("snapshot plan token is malformed")
        return old, new

    async def commit_snapshot(self, plan: SnapshotPlan) -> SnapshotInfo:
        check_name("volume", plan.volume)
        check_name("snapshot", plan.snapshot)
        old, new = self._plan_layers(plan)
        async with self._lock:
            meta = self._load(plan.volume)
            if meta.top != old:
                raise CorruptState(f"volume {plan.volume!r} changed during the snapshot")
            if any(s.name == plan.snapshot for s in meta.snapshots):
                raise AlreadyExists("snapshot", f"{plan.volume}@{plan.snapshot}")
            rec = SnapshotRecord(plan.snapshot, old, meta.virtual_size)
            meta = msgspec.structs.replace(
                meta, chain=[*meta.chain, new], snapshots=[*meta.snapshots, rec]
            )
            self._store(meta)
            self._pending.discard(new)
            self._freeze(old)
            return SnapshotInfo(
                plan.volume, plan.snapshot, rec.virtual_size, _allocated(self.layout.layer(old))
            )

    async def abort_snapshot(self, plan: SnapshotPlan) -> None:
        _, new = self._plan_layers(plan)
        async with self._lock:
            metas = self._load_all()
            if not unreferenced([new], metas):
                raise CorruptState("aborting a snapshot whose layer is already in use")
            self.layout.layer(new).unlink(missing_ok=True)
            self._pending.discard(new)

    async def snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        plan = await self.prepare_snapshot(volume, snapshot)
        try:
            return await self.commit_snapshot(plan)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abort_snapshot(plan)
            raise

    async def rollback(self, volume: str, snapshot: str) -> VolumeInfo:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        async with self._lock:
            self._refuse_merging(volume, "roll back")
            meta = self._load(volume)
            metas = self._load_all()
            snap = meta.snapshot(snapshot)
            # Checks dependents before creating anything.
            plan_rollback(meta, snapshot, "x", metas)
            self._ensure_idle(meta, "rollback")
            top = await self._make_overlay(self.layout.layer(snap.layer), snap.virtual_size)
            plan = plan_rollback(meta, snapshot, top, metas)
            self._store(plan.meta)
            self._delete_layers(plan.dropped)
            return self._info(plan.meta, self._load_all())

    async def delete_snapshot(self, volume: str, snapshot: str) -> None:
        await self.commit_delete_snapshot(await self.prepare_delete_snapshot(volume, snapshot))

    async def prepare_delete_snapshot(self, volume: str, snapshot: str) -> SnapshotDeletion:
        check_name("volume", volume)
        check_name("snapshot", snapshot)
        async with self._lock:
            self._refuse_merging(volume, "delete a snapshot")
            meta = self._load(volume)
            plan = plan_delete_snapshot(meta, snapshot, self._load_all())
            return describe_deletion(self.layout, meta, plan, volume, snapshot)

    async def commit_delete_snapshot(
        self, plan: SnapshotDeletion, *, streamed: bool = False
    ) -> None:
        check_name("volume", plan.volume)
        check_name("snapshot", plan.snapshot)
        async with self._lock:
            self._refuse_merging(plan.volume, "delete a snapshot")
            meta = self._load(plan.volume)
            dplan = plan_delete_snapshot(meta, plan.snapshot, self._load_all())
            if plan.token != deletion_token(dplan):
                raise CorruptState(f"volume {plan.volume!r} changed during the deletion")
            child = self.layout.layer(dplan.child)
            new_backing = self.layout.backing_of(dplan.meta, dplan.child_index)
            if streamed:
                # QEMU merged the layer (block-stream): the top must now stand on
                # the new backing, or the layer is still needed.  Read from the
                # header by the helper itself: a root qemu-img on a top a VM
                # writes would follow whatever data file its header names.
                header = read_header(child)
                if header.backing_file != str(new_backing):
                    raise CorruptState(
                        f"volume {plan.volume!r}: top is backed by {header.backing_file!r} "
                        "after the stream, not by the snapshot's parent; snapshot kept"
                    )
                check_layer(header, new_backing, "the volume's top")
                self._store(dplan.meta)
                self._delete_layers([dplan.layer])
                return
            self._verify_chain(meta)
            chain = self._chain_paths(meta, meta.chain.index(dplan.child))
            new_chain = self._chain_paths(dplan.meta, dplan.child_index - 1)
            self._merging.add(plan.volume)
        try:
            # The merge copies the snapshot's data (seconds per GiB): it runs
            # without the lock, so other volumes' requests go on; this volume
            # is marked and every other operation on it refused meanwhile.
            await self._rebase(chain, new_chain, plan.volume)
            async with self._lock:
                after = plan_delete_snapshot(
                    self._load(plan.volume), plan.snapshot, self._load_all()
                )
                if after.meta != dplan.meta or after.layer != dplan.layer:
                    raise CorruptState(f"volume {plan.volume!r} changed during the merge")
                self._store(dplan.meta)
                self._delete_layers([dplan.layer])
        finally:
            self._merging.discard(plan.volume)

    async def _rebase(self, chain: list[Path], new_chain: list[Path], volume: str) -> None:
        """Copy into ``chain[0]`` what its backing held beyond ``new_chain[0]``
        (content unchanged), both chains pinned; then name the new backing in
        its header."""
        child = chain[0]
        # A frozen child is made writable just for this.
        mode = os.stat(child).st_mode & 0o777
        os.chmod(child, 0o600)
        what = "deleting this snapshot"
        try:
            await self._run_confined(
                cmd.qemu_img_rebase_pinned(chain, new_chain), ro=chain[1:], rw=[child],
                volume=volume, operation=what,
            )
            # Once the data is merged the header must name the new backing
            # (a plain path): a cancelled request must not stop in between.
            with anyio.CancelScope(shield=True):
                await self._run_confined(
                    cmd.qemu_img_set_backing(child, new_chain[0]), ro=[], rw=[child],
                    volume=volume, operation=what,
                )
        finally:
            os.chmod(child, mode)

    # --- maintenance ----------------------------------------------------------------

    async def collect_garbage(self, *, dry_run: bool = True) -> list[str]:
        async with self._lock:
            metas = self._load_all()
            files = {p.name.removesuffix(".qcow2"): p for p in self.layout.layers.glob("*.qcow2")}
            found: list[tuple[str, Path]] = [
                (f"layer {lay}", files[lay])
                for lay in unreferenced(sorted(files), metas)
                if lay not in self._pending and not image_in_use(files[lay])
            ]
            found += [(f"temporary file {p.name}", p) for p in sorted(self.layout.tmp.iterdir())]
            if not dry_run:
                for _, path in found:
                    path.unlink(missing_ok=True)
            return [what for what, _ in found]
