"""Boot templates: a booted VM of one image and shape, saved at one paused
instant (memory and disk), that new VMs resume instead of booting.

A template is an ordinary volume of the helper's own (owner
:data:`TEMPLATE_OWNER`, a uid no user has, so no user's listing shows it,
root's included; named ``tpl-<key>``) with one snapshot, :data:`SNAPSHOT`, taken with memory right
after its VM booted and was configured; its VM is then killed.  The key is a
hash of the image's exact build (the sha256 of its kernel, initrd and root
filesystem, and its kernel command line) and the shape (vCPUs, MiB): a
rebuilt image has another key, so a stale template is never used, and the
next build for the same image and shape removes the stale one.

Claim (:meth:`Templates.claim`, from ``VmStart``): a volume that is fresh from
an image (never booted, default size, no snapshots) started with a network and
no resume of its own gets, when a ready template of its image and shape
exists, the template's disk instead (a copy-on-write clone of the template's
snapshot, swapped in under a new storage key) and the template's memory; the
VM then resumes with a new identity exactly as a fork does (:mod:`.forks`:
link down, new address and MAC, hostname, machine-id, entropy, clock; link
up).  No template: the VM boots cold, and with ``[templates] build = "on-miss"``
the helper builds one in the background for the next start.

Isolation: a template is made by the helper from the image alone and is never
written after its snapshot (its VM is killed; nothing runs on the volume
again); each clone writes to its own overlay.  Without ``share_memory``
clones share no RAM pages: each QEMU reads the saved state into its own
memory.  With ``[templates] share_memory`` the template VM runs with its RAM
in a memfd (``share=on``), its saved state carries that RAM after the device
state (:func:`..vm.engine.snapshots.append_ram`), and each clone maps one
sealed memfd of that RAM (one per template and user: never shared across
users) private copy-on-write (``share=off``, ``x-ignore-shared``): the seals
forbid every write, resize and shared writable mapping, so no clone's QEMU
can change what the others read, and its guest's writes land in its own
private pages.

Pure parts: :func:`template_key`, :func:`template_name`,
:func:`claimable`.  I/O: :class:`Templates`.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import anyio
import structlog
from anyio.abc import TaskGroup

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from .. import images
from ..config import TemplatesConfig
from ..errors import HelperError, RequestFailed
from ..net.naming import mac_for
from ..peercred import PeerCredentials
from ..registry import Registry, SnapshotRecord, VolumeRecord
from ..server import RequestContext
from ..service import WorkspaceService
from ..storage import FromSnapshot
from ..vm.engine.snapshots import copy_extents, ram_offset
from ..vm.engine.types import MIB
from .forks import ForkSource

if TYPE_CHECKING:
    from .lifecycle import VmLifecycle
    from .snapshots import LiveSnapshots

log = structlog.get_logger("agentiso.helper.templates")

#: The owner of every template (the helper itself).
TEMPLATE_OWNER = 2**32 - 3
#: Who owned templates before they had an owner of their own (root: their
#: volumes showed in root's listings); moved at start (:func:`migrate_owner`).
LEGACY_TEMPLATE_OWNER = 0
NAME_PREFIX = "tpl-"
#: The one snapshot of a template volume: its booted instant.
SNAPSHOT = "booted"
#: Bumped when what a template holds changes meaning (its key changes with it).
FORMAT = 1
#: Where a ``pristine_clone_of`` mark names a template instead of a snapshot.
MARK_PREFIX = "template:"
#: The owner of every warm pool VM and volume (:mod:`.pool`): (uid_t)-2, a
#: uid no user has (nor has :data:`TEMPLATE_OWNER`, (uid_t)-3), so no user's
#: listing, root's included, shows them.
POOL_OWNER = 2**32 - 2


#: Every seal: no write, resize or shared writable mapping, and no unsealing.
RAM_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def template_key(image: images.Image, vcpus: int, memory_mib: int,
                 share_memory: bool = False) -> str:
    """16 hex digits naming the template of this image build and shape (and
    whether its saved state carries its RAM for sharing: another layout)."""
    files = image.manifest.files
    parts = [f"agentiso-template-{FORMAT}", image.name, image.manifest.cmdline,
             *(files[f].sha256 for f in ("vmlinuz", "initrd.img", "rootfs.img")),
             str(vcpus), str(memory_mib)]
    if share_memory:
        parts.append("share-memory")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def template_name(key: str) -> str:
    return NAME_PREFIX + key


def is_template(vol: VolumeRecord) -> bool:
    return vol.owner == TEMPLATE_OWNER and vol.name.startswith(NAME_PREFIX)


def ram_holder(vol: VolumeRecord) -> int:
    """Whose copy of a template's RAM a clone on ``vol`` maps: its owner's,
    shared with that owner's other clones; for a warm pool VM (whose user
    is not known yet) one of its own, a negative number no uid is."""
    if vol.owner == POOL_OWNER:
        # By name: the claim swaps a new storage key in between loading the
        # copy and handing it to QEMU.  Pool names are unique (random).
        return -1 - int(hashlib.sha256(vol.name.encode()).hexdigest()[:8], 16)
    return vol.owner


def migrate_owner(registry: Registry) -> list[str]:
    """Give :data:`TEMPLATE_OWNER` the templates root still owns (a helper
    from before they had their own owner); returns their names.  Pure on the
    registry (the caller saves).  A root volume named like a template that
    is not one (no memory snapshot of that name) stays root's."""
    moved = []
    for vol in registry.volumes(LEGACY_TEMPLATE_OWNER):
        snap = next((x for x in vol.snapshots if x.name == SNAPSHOT), None)
        if vol.name.startswith(NAME_PREFIX) and snap is not None and snap.memory_file:
            if any(v.name == vol.name for v in registry.volumes(TEMPLATE_OWNER)):
                continue
            vol.owner = TEMPLATE_OWNER
            moved.append(vol.name)
    return moved


def clone_mark(key: str) -> str:
    return MARK_PREFIX + key


def claimable(vol: VolumeRecord, req: hp.VmStart) -> bool:
    """Whether ``VmStart`` ``req`` on ``vol`` may resume a template instead of
    booting: a network (the new identity needs one), no resume of its own,
    and a volume fresh from its image (never booted: no machine-id given, no
    snapshots) or an unused clone of a template (a retried start)."""
    if req.network is None or req.resume_from is not None or req.resume_snapshot is not None:
        return False
    if vol.snapshots or vol.machine_id is not None:
        return False
    fresh = vol.origin == f"image:{vol.image}" and vol.pristine_clone_of is None
    return fresh or (vol.pristine_clone_of or "").startswith(MARK_PREFIX)


def source_of(snap: SnapshotRecord) -> ForkSource:
    """What resuming the template's snapshot needs (as :func:`.forks.fork_source`)."""
    old_mac = None
    if snap.address is not None:
        addr = ipaddress.ip_address(snap.address)
        if isinstance(addr, ipaddress.IPv4Address):
            old_mac = mac_for(addr)
    assert snap.memory_file is not None
    return ForkSource(memory_file=snap.memory_file, old_mac=old_mac, secret=snap.secret)


@dataclass(frozen=True)
class Ready:
    """A ready template: its volume and what resuming its memory needs."""

    volume: VolumeRecord
    source: ForkSource


def ready_template(registry: Registry, key: str, vcpus: int, memory_mib: int) -> Ready | None:
    """The template ``key`` if it is complete (its snapshot has memory of this shape)."""
    try:
        vol = registry.volume(TEMPLATE_OWNER, template_name(key))
        snap = vol.snapshot(SNAPSHOT)
    except HelperError:
        return None
    if snap.memory_file is None or (snap.vcpus, snap.memory_mib) != (vcpus, memory_mib):
        return None
    return Ready(vol, source_of(snap))


def stale_rams(rams: Collection[tuple[str, int]], running: Collection[int],
               seen: dict[int, float], now: float, keep_s: float) -> list[tuple[str, int]]:
    """The RAM copies (by (key, owner)) to drop at ``now``: those of owners
    who run no VM and were last seen running one (``seen``) ``keep_s`` or
    more ago."""
    return [k for k in rams if k[1] not in running
            and now - seen.get(k[1], float("-inf")) >= keep_s]


def helper_context(server: Any = None) -> RequestContext:
    """A request context for the helper's own template requests."""
    peer = PeerCredentials(pid=os.getpid(), uid=0, gid=0, groups=frozenset())
    return RequestContext(peer=peer, server=cast(Any, server), owner=TEMPLATE_OWNER)


@dataclass
class Templates:
    """Builds templates and hands them to ``VmStart`` (see the module doc)."""

    ws: WorkspaceService
    config: TemplatesConfig
    tg: TaskGroup | None = None
    lifecycle: VmLifecycle | None = None
    snapshots: LiveSnapshots | None = None
    #: Keys being built now (one build per key at a time).
    building: set[str] = field(default_factory=set)
    #: ``share_memory``: the sealed RAM memfd of each ready template for
    #: each owner, by (key, owner uid), loaded from its state file on that
    #: owner's first claim: pages are shared among one user's workspaces,
    #: never across users (shared pages are a cache side channel:
    #: docs/security.md); and the writable memfd of each template VM being
    #: built (by name).
    rams: dict[tuple[str, int], int] = field(default_factory=dict)
    build_rams: dict[str, int] = field(default_factory=dict)
    #: When each owner with a RAM copy was last seen running a VM (or
    #: claiming); the copy is kept ``ram_keep_s`` after (:func:`stale_rams`).
    ram_seen: dict[int, float] = field(default_factory=dict)
    #: A :meth:`_prune_while_kept` task runs.
    pruning: bool = False

    def _key(self, image: images.Image, vcpus: int, memory_mib: int) -> str:
        return template_key(image, vcpus, memory_mib, self.config.share_memory)

    def ram_for(self, vol: VolumeRecord, claimed: bool) -> tuple[int, bool] | None:
        """The memory file ``VmStart`` gives the VM on ``vol``: ``(fd,
        shared)``, or None (anonymous RAM).  A template VM being built writes
        its RAM into its memfd; a start that :meth:`claim` gave a
        share-memory template (``claimed``) maps its sealed memfd privately.
        A clone's fd is a duplicate the caller closes once QEMU runs (QEMU
        starts after the caller let go of ``ws.lock``, when the template may
        be gone); a template VM's is the build's own, open while that VM
        runs: its save reads the RAM from it."""
        if is_template(vol):
            fd = self.build_rams.get(vol.name)
            return None if fd is None else (fd, True)
        mark = vol.pristine_clone_of or ""
        if claimed and mark.startswith(MARK_PREFIX):
            ram = self.rams.get((mark[len(MARK_PREFIX):], ram_holder(vol)))
            return None if ram is None else (os.dup(ram), False)
        return None

    def _load_ram(self, key: str, owner: int, ready: Ready, memory_mib: int) -> bool:
        """Make ``self.rams[key, owner]``: a sealed memfd of the RAM in the
        template's state file.  False: the file holds none (then the template
        is not used)."""
        if (key, owner) in self.rams:
            return True
        size = memory_mib * MIB
        path = self.ws.memory_dir / ready.source.memory_file
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("template_ram_unreadable", template=key, error=str(exc))
            return False
        try:
            off = ram_offset(os.fstat(src).st_size, size)
            ram = os.memfd_create(f"agentiso-tpl-{key}-{owner}",
                                  os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(ram, size)
                copy_extents(src, off, ram, 0, size)
                fcntl.fcntl(ram, fcntl.F_ADD_SEALS, RAM_SEALS)
            except BaseException:
                os.close(ram)
                raise
        except (OSError, HelperError) as exc:
            log.warning("template_ram_unreadable", template=key, error=str(exc))
            return False
        finally:
            os.close(src)
        self.rams[key, owner] = ram
        return True

    def _prune_rams(self) -> None:
        """Close the RAM copies of users who have run no VM for
        ``ram_keep_s``: a copy costs the template's RAM once, worth it while
        siblings share it or a next create of that user may come (a running
        clone keeps its own mapping; a later claim loads a new copy)."""
        now = anyio.current_time()
        running = {m.owner for m in self.ws.registry.vms()}
        self.ram_seen.update(dict.fromkeys(running, now))
        for k in stale_rams(self.rams, running, self.ram_seen, now, self.config.ram_keep_s):
            os.close(self.rams.pop(k))
        for owner in set(self.ram_seen) - {k[1] for k in self.rams}:
            del self.ram_seen[owner]

    async def _prune_while_kept(self) -> None:
        """Prune every quarter of ``ram_keep_s`` while any copy is kept, so a
        copy goes about ``ram_keep_s`` after its user's last VM, claims or
        not; one such task at a time."""
        try:
            while self.rams:
                await anyio.sleep(max(self.config.ram_keep_s / 4, 1.0))
                self._prune_rams()
        finally:
            self.pruning = False

    def _keep_pruning(self) -> None:
        if not self.pruning and self.tg is not None and self.rams:
            self.pruning = True
            self.tg.start_soon(self._prune_while_kept)

    def key_for(self, image_name: str, vcpus: int, memory_mib: int) -> str:
        """The key of the template of this image and shape (built or not)."""
        return self._key(images.load_image(self.ws.images_dir, image_name), vcpus, memory_mib)

    def is_ready(self, key: str, vcpus: int, memory_mib: int) -> bool:
        return ready_template(self.ws.registry, key, vcpus, memory_mib) is not None

    def drop_rams_of(self, holder: int) -> None:
        """Close every RAM copy of ``holder`` (a warm pool VM's, once its QEMU
        maps it: nothing else ever will)."""
        for k in [k for k in self.rams if k[1] == holder]:
            os.close(self.rams.pop(k))
        self.ram_seen.pop(holder, None)

    def _drop_ram(self, key: str) -> None:
        for k in [k for k in self.rams if k[0] == key]:
            os.close(self.rams.pop(k))

    async def claim(self, vol: VolumeRecord, req: hp.VmStart) -> ForkSource | None:
        """Give ``vol`` a ready template's disk and say which memory to resume,
        or None (boot cold; a build may start).  The caller holds ``ws.lock``
        and has checked that no VM uses ``vol``."""
        if not self.config.use or is_template(vol) or not claimable(vol, req):
            return None
        image = images.load_image(self.ws.images_dir, vol.image)
        key = self._key(image, req.vcpus, req.memory_mib)
        ready = ready_template(self.ws.registry, key, req.vcpus, req.memory_mib)
        if ready is None or ready.volume.size_bytes != vol.size_bytes:
            if ready is None:
                self.build_soon(vol.image, req.vcpus, req.memory_mib)
            return None
        if self.config.share_memory:
            self._prune_rams()
            if not await anyio.to_thread.run_sync(
                    self._load_ram, key, ram_holder(vol), ready, req.memory_mib):
                return None
            self.ram_seen[ram_holder(vol)] = anyio.current_time()
            self._keep_pruning()
        if vol.pristine_clone_of != clone_mark(key):
            await self._swap_in_clone(vol, ready.volume, key)
        log.info("template_claimed", volume=vol.key, template=key)
        return ready.source

    async def _swap_in_clone(self, vol: VolumeRecord, tpl: VolumeRecord, key: str) -> None:
        """Replace ``vol``'s (never booted) disk by a clone of the template's
        snapshot, under a new storage key; the old disk goes last, so a crash
        leaves at worst an orphan for ``gc``, never a volume without a disk."""
        storage = self.ws.storage
        new_key = Registry._new_key("v", {v.key for v in self.ws.registry.volumes()})
        await storage.create_volume(new_key, FromSnapshot(tpl.key, SNAPSHOT), None)
        old_key = vol.key
        vol.key = new_key
        vol.pristine_clone_of = clone_mark(key)
        try:
            self.ws.registry.save()
        except BaseException:
            vol.key, vol.pristine_clone_of = old_key, None
            with anyio.CancelScope(shield=True):
                await storage.destroy_volume(new_key)
            raise
        try:
            await storage.destroy_volume(old_key)
        except HelperError as exc:
            log.warning("template_swap_left_disk", key=old_key, error=exc.message,
                        hint="agentiso-helper gc")

    def build_soon(self, image: str, vcpus: int, memory_mib: int) -> None:
        """With ``build = "on-miss"``: build this template in the background."""
        if self.config.build != "on-miss" or self.tg is None:
            return
        self.tg.start_soon(self._build_logged, image, vcpus, memory_mib)

    async def _build_logged(self, image: str, vcpus: int, memory_mib: int) -> None:
        try:
            await self.build(image, vcpus, memory_mib)
        except HelperError as exc:
            log.warning("template_build_failed", image=image, vcpus=vcpus,
                        memory_mib=memory_mib, error=exc.message)

    async def build(self, image_name: str, vcpus: int, memory_mib: int) -> str | None:
        """Build the template of ``image_name`` at this shape unless it is
        ready or being built; return its key (None: another build runs).

        Boots a VM of the helper's own on a fresh volume of the image, takes
        the memory snapshot, kills the VM; then removes stale templates of the
        same image and shape.  A failure removes what it made."""
        assert self.lifecycle is not None and self.snapshots is not None
        image = images.load_image(self.ws.images_dir, image_name)
        key = self._key(image, vcpus, memory_mib)
        if key in self.building:
            return None
        if ready_template(self.ws.registry, key, vcpus, memory_mib) is not None:
            return key
        self.building.add(key)
        name = template_name(key)
        ctx = helper_context()
        if self.config.share_memory:
            ram = os.memfd_create(f"agentiso-build-{key}", os.MFD_CLOEXEC)
            self.build_rams[name] = ram
            os.ftruncate(ram, memory_mib * MIB)
        try:
            await self._remove(name)  # a half-made one (a crash mid-build)
            log.info("template_build", image=image_name, key=key, vcpus=vcpus,
                     memory_mib=memory_mib)
            await self.ws.volume_create(
                hp.VolumeCreate(id=0, name=name, source=hp.FromImage(image=image_name)), ctx)
            try:
                await self.lifecycle.vm_start(
                    hp.VmStart(id=0, name=name, volume=name, vcpus=vcpus,
                               memory_mib=memory_mib), ctx)
                await self.snapshots.snapshot_create(
                    hp.SnapshotCreate(id=0, volume=name, snapshot=SNAPSHOT, memory=True), ctx)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._stop_vm(name)
            ready = ready_template(self.ws.registry, key, vcpus, memory_mib)
            if ready is None:
                raise RequestFailed(ErrorCode.INTERNAL, f"template {key} has no memory snapshot")
            if self.config.share_memory:
                try:
                    size = (self.ws.memory_dir / ready.source.memory_file).stat().st_size
                except OSError as exc:
                    raise RequestFailed(ErrorCode.INTERNAL,
                                        f"template {key}: state unreadable: {exc}") from None
                ram_offset(size, memory_mib * MIB)  # LaunchError: it saved no RAM
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove(name)
            raise
        finally:
            self.building.discard(key)
            build_ram = self.build_rams.pop(name, None)
            if build_ram is not None:
                os.close(build_ram)
        await self._remove_stale(image_name, vcpus, memory_mib, keep=name)
        log.info("template_ready", image=image_name, key=key)
        return key

    async def _stop_vm(self, name: str) -> None:
        assert self.lifecycle is not None
        for m in self.ws.registry.vms(TEMPLATE_OWNER):
            if m.name == name:
                await self.lifecycle.stop_vm(m, 5.0, force=True)

    async def _remove(self, name: str) -> None:
        """Remove template volume ``name`` (and its VM) if it exists and no clone
        still depends on it (then it stays: logged)."""
        await self._stop_vm(name)
        # Clones running on it keep their own mapping; new ones load it again.
        self._drop_ram(name[len(NAME_PREFIX):])
        async with self.ws.lock:
            try:
                vol = self.ws.registry.volume(TEMPLATE_OWNER, name)
            except HelperError:
                return
            try:
                await self.ws.destroy_volume(vol)
            except HelperError as exc:
                log.warning("template_not_removed", template=name, error=exc.message)

    async def _remove_stale(self, image: str, vcpus: int, memory_mib: int, keep: str) -> None:
        for vol in list(self.ws.registry.volumes(TEMPLATE_OWNER)):
            if not vol.name.startswith(NAME_PREFIX) or vol.name == keep or vol.image != image:
                continue
            snap = next((s for s in vol.snapshots if s.name == SNAPSHOT), None)
            if snap is None or (snap.vcpus, snap.memory_mib) == (vcpus, memory_mib):
                log.info("template_stale", template=vol.name)
                await self._remove(vol.name)
