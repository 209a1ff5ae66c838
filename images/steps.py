"""The build steps that touch the system: apt, debootstrap, depmod, mkfs.ext4.

Each step writes into a temporary path next to its destination and renames it into
place when complete, so an interrupted build never leaves a half-made artefact that
a later build would trust.  Every external command runs with stdin closed (CI has
none) and a failure raises :class:`ToolError` carrying the tail of its stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from . import cpio, dpkgstatus, kernelimage, kmods
from .errors import ImageBuildError, ToolError


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; return its stdout; raise :class:`ToolError` when it fails."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{cmd[0]}: not installed") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ToolError(f"{' '.join(cmd[:3])}... exited with {proc.returncode}:\n{tail}")
    return proc.stdout


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- kernel -----------------------------------------------------------------------


def resolve_kernel(metapackage: str) -> tuple[str, str]:
    """(versioned package, its candidate version) the metapackage points at, per apt.

    A fresh CI machine may have no package indexes (images often delete them):
    then ``apt-get update`` runs once and the lookup is retried.
    """
    try:
        text = run(["apt-cache", "show", "--no-all-versions", metapackage])
    except ToolError:
        log(f"{metapackage} unknown to apt: running apt-get update")
        run(["apt-get", "update", "-q"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        text = run(["apt-cache", "show", "--no-all-versions", metapackage])
    meta = dpkgstatus.parse_control(text)
    package = dpkgstatus.versioned_kernel_package(meta)
    fields = dpkgstatus.parse_control(run(["apt-cache", "show", "--no-all-versions", package]))
    return package, fields["version"]


def modules_root(tree: Path) -> Path:
    """The ``lib/modules`` directory of an extracted kernel package (usr-merged or not)."""
    for candidate in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        if candidate.is_dir():
            return candidate
    raise ImageBuildError(f"no lib/modules in extracted kernel {tree}")


def kernel_release(tree: Path) -> str:
    releases = sorted(p.name for p in modules_root(tree).iterdir() if p.is_dir())
    if len(releases) != 1:
        raise ImageBuildError(f"expected one kernel release in {tree}, found {releases}")
    return releases[0]


def deb_file_name(package: str, version: str) -> str:
    """The file name ``apt-get download`` gives an amd64 package."""
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def fetch_kernel(cache: Path, package: str, version: str) -> Path:
    """Download (``apt-get download``) and extract the kernel package; run depmod on it.

    Returns the extracted tree, cached under ``cache/kernel/<package>_<version>``.
    """
    dest = cache / "kernel" / f"{package}_{version}"
    if (dest / ".complete").exists():
        return dest
    debs = cache / "apt"
    debs.mkdir(parents=True, exist_ok=True)
    deb_name = deb_file_name(package, version)
    if not (debs / deb_name).exists():
        log(f"downloading {package}={version}")
        # The sandbox user _apt cannot write into a root-owned build tree.
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=debs,
        )
    tmp = dest.with_name(dest.name + ".tmp")
    remove_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(debs / deb_name), str(tmp)])
    release = kernel_release(tmp)
    # The package ships no modules.dep (its postinst makes it); depmod writes it here.
    base = modules_root(tmp).parent.parent
    run(["depmod", "-b", str(base), release])
    (tmp / ".complete").write_text(f"{package} {version}\n")
    remove_tree(dest)
    tmp.rename(dest)
    return dest


def vmlinuz_path(tree: Path, release: str) -> Path:
    path = tree / "boot" / f"vmlinuz-{release}"
    if not path.is_file():
        raise ImageBuildError(f"{path} is missing from the kernel package")
    return path


def decompress(data: bytes, compression: str) -> bytes:
    """Decompress a kernel payload: stdlib codecs, or the lz4/zstd tools."""
    import bz2
    import gzip
    import lzma

    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "xz":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    if compression == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    if compression == "bzip2":
        return bz2.decompress(data)
    if compression in ("lz4", "zstd"):
        try:
            proc = subprocess.run(
                [compression, "-d", "-c"], input=data, capture_output=True, check=False
            )
        except FileNotFoundError as exc:
            raise ToolError(f"{compression}: not installed") from exc
        if proc.returncode != 0:
            raise ToolError(f"{compression} -d failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout
    raise ImageBuildError(f"no decompressor for a {compression} kernel")


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed, PVH-bootable ELF inside ``bzimage``, or None if it has no PVH entry.

    Raises :class:`ImageBuildError` when the bzImage cannot be taken apart.
    """
    start, length = kernelimage.bzimage_payload(bzimage)
    payload = bzimage[start : start + length]
    compressed, size = kernelimage.split_size_suffix(payload)
    elf = decompress(compressed, kernelimage.compression_of(payload))
    if len(elf) != size:
        raise kernelimage.KernelImageError(f"vmlinux is {len(elf)} bytes, header says {size}")
    return elf if kernelimage.has_pvh_entry(elf) else None


# --- initramfs --------------------------------------------------------------------


def initramfs_bytes(
    kernel_tree: Path, release: str, wanted: tuple[str, ...], busybox: Path, init_script: bytes
) -> tuple[bytes, list[str]]:
    """The gzip-compressed newc archive and the module paths it may load (in order).

    ``etc/modules-load.order`` lists ``<condition> <path>`` lines (see
    :func:`kmods.plan_loads`): the init loads the ``always`` ones, then those whose
    virtio device ids the VM has.  Module signatures are stripped
    (:func:`kmods.strip_signature`).  The kernel's config is checked for gzip
    initramfs support (CONFIG_RD_GZIP).
    """
    import gzip

    config = (kernel_tree / "boot" / f"config-{release}").read_text()
    if "CONFIG_RD_GZIP=y" not in config.splitlines():
        raise ImageBuildError(f"kernel {release} cannot unpack a gzip initramfs")
    mods = modules_root(kernel_tree) / release
    index = kmods.ModuleIndex.parse(
        (mods / "modules.dep").read_text(), (mods / "modules.builtin").read_text()
    )
    plan = kmods.plan_loads(
        index, wanted, kmods.virtio_device_ids((mods / "modules.alias").read_text())
    )
    order = [path for _cond, path in plan]
    load_list = "".join(f"{cond} {path}\n" for cond, path in plan)
    entries: list[cpio.Entry] = [
        cpio.directory("bin"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, 0o666),
        cpio.directory("etc"),
        cpio.directory("lib"),
        cpio.directory("lib/modules"),
        cpio.directory("newroot"),
        cpio.directory("proc"),
        cpio.directory("sys"),
        cpio.regular("bin/busybox", busybox.read_bytes(), 0o755),
        cpio.regular("init", init_script, 0o755),
        cpio.regular("etc/modules-load.order", load_list.encode()),
    ]
    # The applet links `busybox --install` would make at every boot, made here.
    applets = sorted(set(run([str(busybox), "--list"]).split()) | {"sh"})
    entries += [cpio.symlink(f"bin/{a}", "busybox") for a in applets if a != "busybox"]
    made: set[str] = {"lib/modules"}
    for rel in order:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in made:
                made.add(d)
                entries.append(cpio.directory(d))
        module = kmods.strip_signature((mods / rel).read_bytes())
        entries.append(cpio.regular("lib/modules/" + rel, module))
    archive = cpio.archive(entries)
    return gzip.compress(archive, compresslevel=9, mtime=0), order


# --- root filesystem --------------------------------------------------------------

# Trimmed from every image: documentation, translations and apt's downloads and
# indexes (an `apt-get update` restores the latter when a user wants packages).
_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
    "var/log",
)


def debootstrap_base(dest: Path, suite: str, packages: tuple[str, ...], mirror: str) -> None:
    """``debootstrap --variant=minbase`` into ``dest`` (atomically), then trim it."""
    tmp = dest.with_name(dest.name + ".tmp")
    remove_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {suite} from {mirror} (+{','.join(packages)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            "--arch=amd64",
            suite,
            str(tmp),
            mirror,
        ],
        env=env,
    )
    for rel in _TRIM:
        target = tmp / rel
        if target.is_dir():
            for child in target.iterdir():
                remove_tree(child)
    remove_tree(dest)
    tmp.rename(dest)


def hardlink_copy(src: Path, dest: Path) -> None:
    """Copy a tree with hard links for regular files (``cp -a -l``): fast and cheap.

    Callers must replace, never modify in place, any file they change in ``dest``
    (see :func:`replace_file`), or they would write through to the cache.
    """
    remove_tree(dest)
    run(["cp", "-a", "-l", str(src), str(dest)])


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` as a new inode (unlinking any hard link) with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)
    path.chmod(mode)


def copy_package(src: Path, dest: Path) -> None:
    """Copy a Python package directory without bytecode caches."""
    shutil.copytree(
        src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=False
    )


def tree_size(root: Path) -> int:
    """Bytes used by the regular files of a tree (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def make_ext4(tree: Path, image: Path, size_bytes: int, label: str) -> None:
    """``mkfs.ext4 -d tree`` into a new sparse file ``image`` of ``size_bytes``."""
    tmp = image.with_name(image.name + ".tmp")
    remove_tree(tmp)
    with tmp.open("wb") as f:
        f.truncate(size_bytes)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-m",
            "0",
            # Below 512 MiB mke2fs would pick its "small" profile: 1 KiB blocks and
            # 4x the inodes; this filesystem is grown to the disk at boot.
            "-T",
            "default",
            "-b",
            "4096",
            # Zero the inode tables and journal now, so the guest kernel does not
            # spend emulated CPU on it after every boot.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
            str(tree),
            str(tmp),
        ]
    )
    tmp.rename(image)
