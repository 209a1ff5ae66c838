"""Pure builders of the argv lists the backends run.

No shell is ever involved: each function returns a list handed to ``execve``.
Callers pass names already validated by :mod:`.names` and paths the backend
built itself; these functions only assemble.  Option letters are chosen to work
with both current OpenZFS and zfs-fuse's older command set (no ``zfs list -p``,
no ``zfs get -t``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

QEMU_IMG = "qemu-img"
ZFS = "zfs"
ZPOOL = "zpool"


# --- qemu-img -----------------------------------------------------------------


def qemu_img_info(
    path: Path, *, force_share: bool = True, backing_chain: bool = False
) -> list[str]:
    """``qemu-img info`` as JSON.  ``force_share`` (-U) reads an image a VM holds open."""
    argv = [QEMU_IMG, "info", "--output=json"]
    if force_share:
        argv.append("-U")
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(str(path))
    return argv


def qemu_img_check(path: Path, fmt: str = "qcow2") -> list[str]:
    return [QEMU_IMG, "check", "--output=json", "-f", fmt, str(path)]


def qemu_img_convert(source: Path, source_format: str, dest: Path, dest_format: str) -> list[str]:
    """Copy ``source`` into a new image; sparse regions stay sparse (-S default)."""
    argv = [QEMU_IMG, "convert", "-f", source_format, "-O", dest_format]
    if dest_format == "qcow2":
        # Larger clusters: fewer metadata lookups for a chain of overlays.
        argv += ["-o", "cluster_size=65536"]
    return [*argv, str(source), str(dest)]


def qemu_img_convert_to_device(source: Path, source_format: str, device: Path) -> list[str]:
    """Write ``source`` onto a fresh (all-zero, sparse) zvol.

    ``-n``: the target exists; ``--target-is-zero``: zero regions are not written,
    so the zvol stays as sparse as the source.
    """
    return [
        QEMU_IMG, "convert", "-n", "--target-is-zero", "-f", source_format, "-O", "raw",
        str(source), str(device),
    ]  # fmt: skip


def qemu_img_create_overlay(path: Path, backing: Path, backing_format: str, size: int) -> list[str]:
    """A new qcow2 whose backing file is ``backing`` (absolute), format given (-F).

    ``-u`` with an explicit size: qemu-img does not open the backing file, so this
    works while a running QEMU holds it (live snapshots) and costs O(1).
    """
    if not backing.is_absolute():
        raise ValueError(f"backing path must be absolute: {backing}")
    return [
        QEMU_IMG, "create", "-q", "-f", "qcow2", "-u",
        "-b", str(backing), "-F", backing_format,
        "-o", "cluster_size=65536",
        str(path), str(size),
    ]  # fmt: skip


def qemu_img_create(path: Path, fmt: str, size: int) -> list[str]:
    return [QEMU_IMG, "create", "-q", "-f", fmt, str(path), str(size)]


def qemu_img_rebase(path: Path, new_backing: Path, backing_format: str) -> list[str]:
    """Safe rebase: copies into ``path`` whatever differs between old and new backing."""
    if not new_backing.is_absolute():
        raise ValueError(f"backing path must be absolute: {new_backing}")
    return [
        QEMU_IMG, "rebase", "-f", "qcow2", "-b", str(new_backing), "-F", backing_format,
        str(path),
    ]  # fmt: skip


def qemu_img_resize(path: Path, fmt: str, size: int) -> list[str]:
    return [QEMU_IMG, "resize", "-q", "-f", fmt, str(path), str(size)]


# --- qemu-img on guest-written qcow2 chains, pinned ---------------------------
#
# A layer's header names its backing file, and a QEMU that wrote the layer
# could have rewritten that name.  These builders hand qemu-img the whole
# chain as explicit options (a ``json:`` filename): every node's ``backing``
# is given, down to the base's ``null``, and explicit options override what a
# header says, so root's qemu-img opens exactly the files listed here.


def pinned_chain(chain: Sequence[Path], *, with_driver: bool = True) -> dict[str, object]:
    """Options of a qcow2 chain, ``chain[0]`` on top, the last one with no backing."""
    if not chain:
        raise ValueError("an empty chain")
    for p in chain:
        if not p.is_absolute():
            raise ValueError(f"chain paths must be absolute: {p}")
    node: object = None
    for path in reversed(chain):
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                "backing": node}
    assert isinstance(node, dict)
    if not with_driver:
        node = {k: v for k, v in node.items() if k != "driver"}
    return node


def json_filename(options: dict[str, object]) -> str:
    return "json:" + json.dumps(options, separators=(",", ":"), sort_keys=True)


def qemu_img_resize_pinned(chain: Sequence[Path], size: int) -> list[str]:
    """Resize ``chain[0]``, its backing chain pinned to ``chain[1:]``."""
    return [QEMU_IMG, "resize", "-q", json_filename(pinned_chain(chain)), str(size)]


def qemu_img_rebase_pinned(chain: Sequence[Path], new_chain: Sequence[Path]) -> list[str]:
    """Safe rebase of ``chain[0]`` (whose chain is pinned) onto ``new_chain[0]`` (pinned).

    The header then records the ``json:`` name; :func:`qemu_img_set_backing`
    writes the plain path afterwards.  (``-F`` gives the driver, so the
    ``-b`` options carry none: qemu-img refuses both.)"""
    return [
        QEMU_IMG, "rebase", "-q", "-F", "qcow2",
        "-b", json_filename(pinned_chain(new_chain, with_driver=False)),
        json_filename(pinned_chain(chain)),
    ]  # fmt: skip


def qemu_img_set_backing(path: Path, backing: Path) -> list[str]:
    """Only rewrite ``path``'s header to name ``backing`` (qcow2); opens no backing."""
    if not backing.is_absolute():
        raise ValueError(f"backing path must be absolute: {backing}")
    return [
        QEMU_IMG, "rebase", "-u", "-F", "qcow2", "-b", str(backing),
        json_filename(pinned_chain([path])),
    ]  # fmt: skip


# --- zfs / zpool --------------------------------------------------------------


def _props(props: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in sorted(props.items()):
        out += ["-o", f"{k}={v}"]
    return out


def zfs_create(
    dataset: str, props: dict[str, str] | None = None, *, parents: bool = False
) -> list[str]:
    argv = [ZFS, "create"]
    if parents:
        argv.append("-p")
    return [*argv, *_props(props or {}), dataset]


def zfs_create_zvol(
    dataset: str, size: int, props: dict[str, str] | None = None, *, sparse: bool = True
) -> list[str]:
    """A zvol of ``size`` bytes; sparse (-s: no refreservation) like a qcow2 file."""
    argv = [ZFS, "create"]
    if sparse:
        argv.append("-s")
    return [*argv, "-V", str(size), *_props(props or {}), dataset]


def zfs_snapshot(dataset: str, snapshot: str) -> list[str]:
    return [ZFS, "snapshot", f"{dataset}@{snapshot}"]


def zfs_clone(origin: str, dataset: str, props: dict[str, str] | None = None) -> list[str]:
    """``origin`` is ``pool/ds@snap``."""
    return [ZFS, "clone", *_props(props or {}), origin, dataset]


def zfs_rollback(dataset: str, snapshot: str, *, destroy_later: bool) -> list[str]:
    argv = [ZFS, "rollback"]
    if destroy_later:
        argv.append("-r")
    return [*argv, f"{dataset}@{snapshot}"]


def zfs_destroy(target: str, *, recursive: bool = False) -> list[str]:
    """Destroy a dataset or ``ds@snap``.  Never ``-R``: clones are promoted, not destroyed."""
    argv = [ZFS, "destroy"]
    if recursive:
        argv.append("-r")
    return [*argv, target]


def zfs_unmount(dataset: str) -> list[str]:
    return [ZFS, "unmount", dataset]


def zfs_promote(dataset: str) -> list[str]:
    return [ZFS, "promote", dataset]


def zfs_rename(old: str, new: str) -> list[str]:
    return [ZFS, "rename", old, new]


def zfs_set(dataset: str, prop: str, value: str) -> list[str]:
    return [ZFS, "set", f"{prop}={value}", dataset]


def zfs_get(datasets: Sequence[str], props: Sequence[str], *, recursive: bool = False) -> list[str]:
    """Machine-readable ``name<TAB>property<TAB>value`` lines, exact byte counts (-p)."""
    argv = [ZFS, "get", "-H", "-p"]
    if recursive:
        argv.append("-r")
    return [*argv, "-o", "name,property,value", ",".join(props), *datasets]


def zpool_list(pool: str | None = None) -> list[str]:
    argv = [ZPOOL, "list", "-H", "-o", "name,health"]
    return [*argv, pool] if pool else argv


def zpool_create(pool: str, vdev: Path, mountpoint: Path) -> list[str]:
    return [ZPOOL, "create", "-m", str(mountpoint), pool, str(vdev)]


def zpool_destroy(pool: str) -> list[str]:
    return [ZPOOL, "destroy", "-f", pool]
