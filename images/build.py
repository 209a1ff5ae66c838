"""``python -m images.build --image NAME``: build or refresh build/images/NAME/.

Outputs (the contract with the VM engine and the boot harness):

* ``vmlinuz``      Debian's cloud kernel, extracted from its package, as the
  uncompressed PVH ELF (the bzImage when it has no PVH entry);
* ``initrd.img``   busybox + virtio/vsock/fw_cfg/rng modules, mounts /dev/vda,
  switch_roots;
* ``rootfs.img``   raw ext4 (no partition table) made by ``mkfs.ext4 -d``;
* ``manifest.json`` versions, sha256 and size of each file, the kernel ``cmdline``,
  and the cache keys each output was built from.

Caches live in build/cache/: downloaded .debs, the extracted kernel, initramfs
archives by key, and the debootstrap base tree by key (suite + packages + base
version).  The agent layer (protocol/, guest/, agentiso-init, msgspec) is applied on
a hard-linked copy of the base, so a guest code change costs one mkfs.ext4.  An image
whose keys and file sizes match its manifest is left alone: a no-change build only
queries apt and hashes the agent sources.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import cachekey, dpkgstatus, hosttsc, plan, specs, steps
from .aptsources import choose_mirror, parse_sources_files
from .errors import ImageBuildError, ToolError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: Version of the debootstrap step: bump to rebuild every cached base tree.
BASE_VERSION = 1
#: Version of the kernel step (2: uncompressed PVH ELF): bump to redo vmlinuz.
KERNEL_STEP_VERSION = 2
#: Free space left in a fresh rootfs; the guest grows it further to the disk size.
HEADROOM_BYTES = 256 << 20
#: Where the guest package goes in the rootfs.
SITE = Path("usr/lib/python3/dist-packages")


def host_apt_sources() -> list[tuple[str, str]]:
    """(name, text) of the host's apt source files, in the order apt reads them."""
    etc = Path("/etc/apt")
    files = [etc / "sources.list"]
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.iterdir())
    return [(p.name, p.read_text()) for p in files if p.is_file()]


def package_version(package: str) -> str:
    return steps.run(["dpkg-query", "-W", "-f=${Version}", package]).strip()


def busybox_binary() -> Path:
    """The static busybox shipped by the busybox-static package."""
    for line in steps.run(["dpkg-query", "-L", "busybox-static"]).splitlines():
        if line.endswith("/bin/busybox"):
            return Path(line)
    raise ImageBuildError("busybox-static ships no bin/busybox")


def msgspec_info(python: str) -> dict[str, str]:
    """Version, package directory and extension suffix of msgspec under ``python``."""
    code = (
        "import json, os, sys, sysconfig, msgspec;"
        "print(json.dumps({'version': msgspec.__version__,"
        " 'dir': os.path.dirname(msgspec.__file__),"
        " 'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX')}))"
    )
    info: dict[str, str] = json.loads(steps.run([python, "-c", code]))
    return info


def guest_ext_suffix(python_minor: str) -> str:
    return f".cpython-{python_minor.replace('.', '')}-x86_64-linux-gnu.so"


def install_msgspec(
    dest: Path, python: str, info: dict[str, str], python_minor: str, cache: Path
) -> None:
    """Put msgspec for the guest's CPython into ``dest`` (site-packages/msgspec).

    Preferred: copy the build host's installed package when it was built for the
    same ABI (CPython minor version, x86_64, glibc) — same bytes the host tests run,
    no network.  Otherwise download the matching manylinux wheel of the same
    version from PyPI with ``pip download --only-binary=:all:``.
    """
    if info["ext_suffix"] == guest_ext_suffix(python_minor):
        steps.copy_package(Path(info["dir"]), dest)
        return
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_minor.replace(".", "")
    steps.run(
        [
            python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python_minor, "--abi", abi,
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "-d", str(wheels), f"msgspec=={info['version']}",
        ]
    )  # fmt: skip
    matches = sorted(wheels.glob(f"msgspec-{info['version']}-{abi}-*.whl"))
    if not matches:
        raise ImageBuildError(f"no msgspec {info['version']} wheel for {abi}")
    import zipfile

    with zipfile.ZipFile(matches[-1]) as wheel:
        for member in wheel.namelist():
            if member.startswith("msgspec/"):
                wheel.extract(member, dest.parent)


def agent_sources() -> list[tuple[str, Path]]:
    return [("protocol", REPO / "protocol"), ("guest", REPO / "guest")]


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


def host_tsc_khz() -> int | None:
    try:
        return hosttsc.tsc_khz_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def agentiso_version() -> str:
    """The project version from pyproject.toml (what the guest layer is part of)."""
    import tomllib

    try:
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"
    return str(version)


def base_key(spec: specs.ImageSpec) -> str:
    """Cache key of an image's debootstrap base tree."""
    return cachekey.key_of(
        "rootfs-base",
        {
            "suite": specs.SUITE,
            "arch": specs.ARCH,
            "packages": sorted(spec.packages),
            "base_version": BASE_VERSION,
        },
    )


def prune(directory: Path, keep: set[str]) -> None:
    """Remove entries of a cache directory whose names are not in ``keep``.

    Keeps build/ bounded: every guest change would otherwise leave an initramfs or
    a base tree behind.  Temporary ``.tmp`` entries of a crashed build go too.
    """
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name not in keep:
            steps.remove_tree(entry)


class Builder:
    """One image build: computes keys, consults the plan, runs the stale steps."""

    def __init__(self, spec: specs.ImageSpec, python: str, build_dir: Path) -> None:
        self.spec = spec
        self.python = python
        self.cache = build_dir / "cache"
        self.out = build_dir / "images" / spec.name
        self.kernel_tree: Path | None = None
        # Learnt while building; None when that step did not run this time (the
        # manifest then keeps the previous build's value).
        self.kernel_format: str | None = None
        self.python_version: str | None = None
        self.tsc_khz = host_tsc_khz()
        self.cmdline = hosttsc.with_tsc_khz(specs.CMDLINE, self.tsc_khz)

    # -- keys ------------------------------------------------------------------------

    def compute_keys(self) -> dict[str, str]:
        self.kernel_package, self.kernel_version = steps.resolve_kernel(specs.KERNEL_METAPACKAGE)
        self.kernel_release = self.kernel_package.removeprefix("linux-image-")
        self.busybox = busybox_binary()
        self.busybox_version = package_version("busybox-static")
        self.msgspec = msgspec_info(self.python)
        builder_digest = cachekey.tree_digest([("images", HERE)])
        kernel: dict[str, cachekey.KeyInput] = {
            "package": self.kernel_package,
            "version": self.kernel_version,
        }
        self.base_key = base_key(self.spec)
        layer_digest = cachekey.tree_digest(agent_sources())
        return {
            "vmlinuz": cachekey.key_of(
                "vmlinuz",
                {
                    **kernel,
                    "format": KERNEL_STEP_VERSION,
                    # Without the tool the bzImage is shipped; installing it must
                    # bring the faster ELF.
                    "decompressors": [t for t in ("lz4", "zstd") if shutil.which(t)],
                },
            ),
            "initrd.img": cachekey.key_of(
                "initrd",
                {
                    **kernel,
                    "modules": [*specs.INITRAMFS_MODULES],
                    "busybox": self.busybox_version,
                    "builder": builder_digest,
                },
            ),
            "rootfs.img": cachekey.key_of(
                "rootfs",
                {
                    "base": self.base_key,
                    "layer": layer_digest,
                    "msgspec": self.msgspec["version"],
                    "hostname": self.spec.hostname,
                    "builder": builder_digest,
                    "headroom": HEADROOM_BYTES,
                },
            ),
        }

    # -- steps -----------------------------------------------------------------------

    def kernel(self) -> Path:
        if self.kernel_tree is None:
            self.kernel_tree = steps.fetch_kernel(
                self.cache, self.kernel_package, self.kernel_version
            )
        return self.kernel_tree

    def build_vmlinuz(self) -> None:
        """The kernel as an uncompressed PVH ELF when it has a PVH entry, else the bzImage.

        QEMU loads an ELF itself, so the guest skips decompressing the kernel (about
        0.3 s of emulated CPU under TCG): see images/kernelimage.py.
        """
        src = steps.vmlinuz_path(self.kernel(), self.kernel_release)
        bzimage = src.read_bytes()
        try:
            elf = steps.pvh_kernel(bzimage)
        except ToolError as exc:
            # The cloud kernel is LZ4-compressed; without the lz4 tool the bzImage
            # still boots, only slower.  Said here and recorded in the manifest.
            steps.log(f"shipping the compressed bzImage: {exc} (apt-get install lz4)")
            elf = None
        self.kernel_format = "elf-pvh" if elf is not None else "bzimage"
        write_atomically(self.out / "vmlinuz", elf if elf is not None else bzimage)

    def build_initrd(self, key: str) -> None:
        cached = self.cache / "initramfs" / f"{key}.img"
        if not cached.exists():
            data, order = steps.initramfs_bytes(
                self.kernel(),
                self.kernel_release,
                specs.INITRAMFS_MODULES,
                self.busybox,
                (HERE / "initramfs-init.sh").read_bytes(),
            )
            steps.log(f"initramfs: {len(order)} modules, {len(data) >> 10} KiB")
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cached, data)
        tmp = self.out / "initrd.img.tmp"
        shutil.copyfile(cached, tmp)
        tmp.rename(self.out / "initrd.img")

    def base_tree(self) -> Path:
        base = self.cache / "rootfs-base" / self.base_key
        if not base.is_dir():
            sources = parse_sources_files(host_apt_sources())
            mirror = choose_mirror(sources, specs.SUITE, os.environ)
            steps.debootstrap_base(base, specs.SUITE, self.spec.packages, mirror)
        return base

    def guest_python_minor(self, tree: Path) -> str:
        versions = dpkgstatus.installed_versions((tree / "var/lib/dpkg/status").read_text())
        minors = sorted(
            p.removeprefix("python")
            for p in versions
            if p.startswith("python3.") and p.removeprefix("python").replace(".", "").isdigit()
        )
        if not minors:
            raise ImageBuildError("no python3.X package in the base tree")
        self.python_version = versions[f"python{minors[-1]}"]
        return minors[-1]

    def build_rootfs(self) -> None:
        base = self.base_tree()
        stage = self.cache / "stage" / self.spec.name
        stage.parent.mkdir(parents=True, exist_ok=True)
        steps.hardlink_copy(base, stage)
        minor = self.guest_python_minor(stage)
        site = stage / SITE
        steps.copy_package(REPO / "protocol", site / "agentiso" / "protocol")
        steps.copy_package(REPO / "guest", site / "agentiso" / "guest")
        install_msgspec(site / "msgspec", self.python, self.msgspec, minor, self.cache)
        # Bytecode compiled by the guest's own python, checked by hash not mtime, so the
        # agent starts without compiling (slow under TCG) and never writes .pyc files.
        steps.run(
            [
                "chroot", str(stage), f"python{minor}", "-m", "compileall", "-q",
                "--invalidation-mode", "unchecked-hash",
                f"/{SITE}/agentiso", f"/{SITE}/msgspec",
            ]
        )  # fmt: skip
        steps.replace_file(
            stage / "sbin/agentiso-init", (HERE / "agentiso-init.sh").read_bytes(), 0o755
        )
        host = self.spec.hostname
        steps.replace_file(stage / "etc/hostname", f"{host}\n".encode())
        hosts = f"127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost\n"
        steps.replace_file(stage / "etc/hosts", hosts.encode())
        # Placeholder: the guest agent writes the DNS servers the host hands it.
        steps.replace_file(stage / "etc/resolv.conf", b"# written by the agentiso guest agent\n")
        # The root the initramfs mounts, for tools that read fstab (mount -o remount).
        steps.replace_file(stage / "etc/fstab", b"/dev/vda\t/\text4\trw,relatime\t0\t1\n")
        mtab = stage / "etc/mtab"
        if not (mtab.exists() or mtab.is_symlink()):
            mtab.symlink_to("../proc/self/mounts")
        used = steps.tree_size(stage)
        # ext4 metadata (inode tables, journal, bitmaps) is about 5% plus a fixed part.
        size = used * 105 // 100 + (48 << 20) + HEADROOM_BYTES
        size = (size + (4 << 20) - 1) // (4 << 20) * (4 << 20)
        # The init grows the filesystem only when the disk differs from this.
        steps.replace_file(stage / "var/lib/agentiso/rootfs-sectors", f"{size // 512}\n".encode())
        steps.make_ext4(stage, self.out / "rootfs.img", size, "agentiso-root")
        steps.remove_tree(stage)

    # -- driver ------------------------------------------------------------------------

    def build(self) -> list[str]:
        keys = self.compute_keys()
        manifest_path = self.out / "manifest.json"
        old = read_manifest(manifest_path)
        sizes = {}
        for name in plan.OUTPUTS:
            p = self.out / name
            sizes[name] = p.stat().st_size if p.is_file() else None
        stale = plan.outputs_to_build(keys, old, sizes)
        if not stale:
            # The command line is no artefact: a change (another host's TSC rate)
            # only rewrites the manifest.
            if old is not None and old.get("cmdline") != self.cmdline:
                self.write_manifest(keys, old, [])
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        # Invalidate the manifest first: an interrupted build must not look complete.
        manifest_path.unlink(missing_ok=True)
        for name in stale:
            started = time.monotonic()
            if name == "vmlinuz":
                self.build_vmlinuz()
            elif name == "initrd.img":
                self.build_initrd(keys[name])
            else:
                self.build_rootfs()
            steps.log(f"{self.spec.name}/{name}: built in {time.monotonic() - started:.1f} s")
        self.write_manifest(keys, old, stale)
        self.prune_caches(keys)
        return stale

    def prune_caches(self, keys: dict[str, str]) -> None:
        """Drop cached artefacts no image of the current specs can use."""
        prune(self.cache / "initramfs", {f"{keys['initrd.img']}.img"})
        prune(self.cache / "rootfs-base", {base_key(s) for s in specs.IMAGES.values()})
        kernel = f"{self.kernel_package}_{self.kernel_version}"
        prune(self.cache / "kernel", {kernel})
        prune(self.cache / "apt", {steps.deb_file_name(self.kernel_package, self.kernel_version)})

    def write_manifest(
        self, keys: dict[str, str], old: dict[str, Any] | None, stale: list[str]
    ) -> None:
        old_files = old.get("files", {}) if old else {}
        files: dict[str, Any] = {}
        for name in plan.OUTPUTS:
            p = self.out / name
            if name in stale or name not in old_files:
                files[name] = {"sha256": steps.sha256_file(p), "size": p.stat().st_size}
            else:
                files[name] = old_files[name]
        versions: dict[str, Any] = dict(old.get("versions", {})) if old else {}
        versions.update(
            {
                "kernel_package": self.kernel_package,
                "kernel_version": self.kernel_version,
                "kernel_release": self.kernel_release,
                "debian_suite": specs.SUITE,
                "msgspec": self.msgspec["version"],
                "agentiso": agentiso_version(),
                "busybox": self.busybox_version,
            }
        )
        if self.kernel_format is not None:
            versions["kernel_format"] = self.kernel_format
        if self.python_version is not None:
            versions["python"] = self.python_version
        manifest = {
            "format": 1,
            "name": self.spec.name,
            "cmdline": self.cmdline,
            "host_tsc_khz": self.tsc_khz,
            "versions": versions,
            "packages": sorted(self.spec.packages),
            "initramfs_modules": list(specs.INITRAMFS_MODULES),
            "files": files,
            "inputs": keys,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        write_atomically(self.out / "manifest.json", text.encode())


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds sharing a build dir (several `make test` runs at once).

    The second builder waits, then finds the image up to date.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with (build_dir / ".image-build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            steps.log("another image build is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m images.build", description="Build a guest image under build/images/."
    )
    parser.add_argument("--image", default="minimal", choices=sorted(specs.IMAGES))
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="python whose msgspec is copied into the guest (same ABI)",
    )
    parser.add_argument("--build-dir", type=Path, default=REPO / "build")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("image build needs root (debootstrap, chroot)", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        build_dir = args.build_dir.resolve()
        with build_lock(build_dir):
            stale = Builder(specs.IMAGES[args.image], args.python, build_dir).build()
    except (ImageBuildError, OSError, subprocess.SubprocessError) as exc:
        print(f"image build failed: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    what = f"rebuilt {', '.join(stale)}" if stale else "up to date"
    steps.log(f"{args.image}: {what} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
