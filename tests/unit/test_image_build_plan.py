"""Cache keys, rebuild planning and package metadata of the image build."""

from __future__ import annotations

from pathlib import Path

import pytest

from images import cachekey, dpkgstatus, plan
from images.errors import ImageBuildError, PackageMetadataError

KEYS = {"vmlinuz": "k1", "initrd.img": "k2", "rootfs.img": "k3"}
SIZES: dict[str, int | None] = {"vmlinuz": 10, "initrd.img": 20, "rootfs.img": 30}


def manifest(
    keys: dict[str, str] = KEYS, sizes: dict[str, int | None] = SIZES
) -> dict[str, object]:
    return {
        "inputs": dict(keys),
        "files": {n: {"sha256": "x", "size": s} for n, s in sizes.items()},
    }


# --- cache keys --------------------------------------------------------------------


def test_key_is_order_independent_and_input_sensitive() -> None:
    a = cachekey.key_of("base", {"suite": "bookworm", "packages": ["a", "b"]})
    b = cachekey.key_of("base", {"packages": ["a", "b"], "suite": "bookworm"})
    assert a == b
    assert a != cachekey.key_of("base", {"suite": "bookworm", "packages": ["a", "c"]})
    assert a != cachekey.key_of("other", {"suite": "bookworm", "packages": ["a", "b"]})
    assert len(a) == 64


def test_tree_digest_tracks_content_names_and_exec_bit_but_not_bytecode(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    d0 = cachekey.tree_digest([("pkg", root)])
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (root / "b.pyc").write_bytes(b"junk")
    assert cachekey.tree_digest([("pkg", root)]) == d0
    (root / "a.py").write_text("x = 2\n")
    d1 = cachekey.tree_digest([("pkg", root)])
    assert d1 != d0
    (root / "a.py").chmod(0o755)
    assert cachekey.tree_digest([("pkg", root)]) != d1
    assert cachekey.tree_digest([("other", root)]) != cachekey.tree_digest([("pkg", root)])
    (root / "a.py").chmod(0o644)
    (root / "a.py").rename(root / "c.py")
    assert cachekey.tree_digest([("pkg", root)]) != d1


# --- plan --------------------------------------------------------------------------


def test_nothing_to_do_when_keys_and_sizes_match() -> None:
    assert plan.outputs_to_build(KEYS, manifest(), SIZES) == []


def test_everything_without_a_manifest() -> None:
    assert plan.outputs_to_build(KEYS, None, SIZES) == list(plan.OUTPUTS)


def test_only_the_output_whose_key_changed() -> None:
    assert plan.outputs_to_build({**KEYS, "rootfs.img": "new"}, manifest(), SIZES) == ["rootfs.img"]


def test_missing_or_resized_file_is_rebuilt() -> None:
    assert plan.outputs_to_build(KEYS, manifest(), {**SIZES, "vmlinuz": None}) == ["vmlinuz"]
    assert plan.outputs_to_build(KEYS, manifest(), {**SIZES, "initrd.img": 21}) == ["initrd.img"]


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"inputs": "garbage", "files": []},
        {"inputs": KEYS, "files": {"vmlinuz": "nope"}},
        {"inputs": KEYS, "files": {"vmlinuz": {"size": "10"}}},
    ],
)
def test_a_malformed_manifest_means_rebuild_not_crash(bad: dict[str, object]) -> None:
    assert "vmlinuz" in plan.outputs_to_build(KEYS, bad, SIZES)


# --- dpkg metadata -----------------------------------------------------------------

STATUS = """\
Package: python3.11
Status: install ok installed
Version: 3.11.2-6+deb12u6
Description: a
 continuation: not a field

Package: removed-thing
Status: deinstall ok config-files
Version: 1.0

Package: kmod
Status: install ok installed
Version: 30+20221128-1
"""


def test_installed_versions_only_counts_installed_packages() -> None:
    assert dpkgstatus.installed_versions(STATUS) == {
        "python3.11": "3.11.2-6+deb12u6",
        "kmod": "30+20221128-1",
    }


def test_versioned_kernel_package_from_the_metapackage() -> None:
    meta = dpkgstatus.parse_control(
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\n"
        "Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n\nPackage: other\n"
    )
    assert meta["version"] == "6.1.192-3"
    assert dpkgstatus.versioned_kernel_package(meta) == "linux-image-6.1.0-57-cloud-amd64"


@pytest.mark.parametrize(
    "depends", ["", "linux-image-cloud-amd64-dbg", "initramfs-tools | linux-initramfs-tool"]
)
def test_no_versioned_kernel_dependency_is_a_typed_error(depends: str) -> None:
    with pytest.raises(PackageMetadataError):
        dpkgstatus.versioned_kernel_package({"depends": depends})
    assert issubclass(PackageMetadataError, ImageBuildError)
