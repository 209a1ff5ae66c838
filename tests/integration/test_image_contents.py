"""What the built images contain, read with the real tools (debugfs, the cpio reader).

No VM is booted: ``debugfs`` reads the ext4 image file directly.  Each image is
skipped with the reason when it is not built (``make image [IMAGE=dev]``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import stat
import subprocess
from pathlib import Path

import pytest

from images.kmods import module_name
from tests.harness.images import require_image

SITE = "/usr/lib/python3/dist-packages"


def built(name: str) -> Path:
    return require_image(name, tools=("debugfs",)).dir


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout


def file_mode(image: Path, path: str) -> int | None:
    """st_mode of ``path`` in the ext4 image (symlinks not followed), None if absent."""
    out = debugfs(image, f'stat "{path}"')
    for line in out.splitlines():
        if line.startswith("Inode:") and "Mode:" in line:
            kind = line.split("Type:")[1].split()[0]
            perm = int(line.split("Mode:")[1].split()[0], 8)
            types = {"regular": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}
            return types.get(kind, 0) | perm
    return None


def exists(image: Path, *candidates: str) -> bool:
    """True if one of the paths exists (usr-merged /bin, /sbin are symlinks)."""
    return any(file_mode(image, p) is not None for p in candidates)


def newc_members(blob: bytes) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    pos = 0
    while True:
        head = blob[pos : pos + 110]
        assert head[:6] == b"070701"
        filesize = int(head[54:62], 16)
        namesize = int(head[94:102], 16)
        pos += 110
        name = blob[pos : pos + namesize - 1].decode()
        pos += namesize + (-(pos + namesize) % 4)
        data = blob[pos : pos + filesize]
        pos += filesize + (-(pos + filesize) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = data


def test_manifest_hashes_and_sizes_match_the_files() -> None:
    directory = built("minimal")
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        path = directory / name
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert manifest["files"][name] == {"sha256": h.hexdigest(), "size": path.stat().st_size}
    versions = manifest["versions"]
    for key in (
        "kernel_package",
        "kernel_version",
        "debian_suite",
        "python",
        "msgspec",
        "agentiso",
    ):
        assert versions.get(key), key
    assert versions["python"].startswith("3.11")
    assert "console=ttyS0" in manifest["cmdline"]


def test_minimal_rootfs_has_the_contract_contents() -> None:
    rootfs = built("minimal") / "rootfs.img"
    init = file_mode(rootfs, "/usr/sbin/agentiso-init") or file_mode(rootfs, "/sbin/agentiso-init")
    assert init is not None and stat.S_ISREG(init) and init & 0o111
    for path in (
        f"{SITE}/agentiso/guest/__main__.py",
        f"{SITE}/agentiso/protocol/framing.py",
        f"{SITE}/msgspec/__init__.py",
        "/usr/bin/python3.11",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/fstab",
        "/etc/mtab",
        "/var/lib/agentiso/rootfs-sectors",
    ):
        assert exists(rootfs, path), path
    # The agent's bytecode is precompiled (compiling under TCG would slow every boot).
    assert "cpython-311.pyc" in debugfs(rootfs, f"ls {SITE}/agentiso/guest/__pycache__")
    assert ".cpython-311-x86_64-linux-gnu.so" in debugfs(rootfs, f"ls {SITE}/msgspec")
    # The tools the agent and the init use: iproute2, e2fsprogs, util-linux, procps, kmod.
    for tool in ("ip", "resize2fs", "fsfreeze", "ps", "modprobe"):
        assert exists(rootfs, f"/usr/bin/{tool}", f"/usr/sbin/{tool}", f"/bin/{tool}"), tool
    # Trimmed: no apt indexes or docs.
    assert "Packages" not in debugfs(rootfs, "ls /var/lib/apt/lists")
    # 4 KiB blocks even though the image is under 512 MiB.
    assert (
        "Block size:               4096"
        in subprocess.run(
            ["dumpe2fs", "-h", str(rootfs)], capture_output=True, text=True, check=True
        ).stdout
    )


def test_initramfs_has_busybox_init_and_the_modules_in_order() -> None:
    directory = built("minimal")
    members = newc_members(gzip.decompress((directory / "initrd.img").read_bytes()))
    assert {"init", "bin/busybox", "dev/console", "etc/modules-load.order"} <= set(members)
    plan = [line.split() for line in members["etc/modules-load.order"].decode().splitlines()]
    cond = {module_name(path) + ".ko": c for c, path in plan}
    modules = list(cond)
    assert modules.index("virtio.ko") < modules.index("virtio_mmio.ko")
    assert cond["virtio_mmio.ko"] == cond["qemu_fw_cfg.ko"] == "always"
    assert cond["virtio_blk.ko"] == "0x0002"
    assert cond["virtio_net.ko"] == "0x0001"
    assert cond["virtio_console.ko"] == "0x0003"
    assert cond["virtio_rng.ko"] == "0x0004"
    assert cond["vsock.ko"] == cond["vmw_vsock_virtio_transport.ko"] == "0x0013"
    for _c, path in plan:
        module = members[f"lib/modules/{path}"]
        assert module.startswith(b"\x7fELF")
        assert not module.endswith(b"~Module signature appended~\n")


def test_dev_rootfs_adds_the_toolchain() -> None:
    rootfs = built("dev") / "rootfs.img"
    for tool in ("git", "curl", "gcc", "make"):
        assert exists(rootfs, f"/usr/bin/{tool}"), tool
    assert exists(rootfs, "/etc/ssl/certs/ca-certificates.crt")
    assert exists(rootfs, f"{SITE}/agentiso/guest/__main__.py")


def test_kernel_is_an_uncompressed_pvh_elf() -> None:
    from images.kernelimage import has_pvh_entry

    directory = built("minimal")
    manifest = json.loads((directory / "manifest.json").read_text())
    kernel = (directory / "vmlinuz").read_bytes()
    if manifest["versions"].get("kernel_format") == "bzimage":
        pytest.skip(reason="this kernel has no PVH entry: the bzImage is shipped")
    assert manifest["versions"]["kernel_format"] == "elf-pvh"
    assert has_pvh_entry(kernel)
