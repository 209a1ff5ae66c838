"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.zfs import ZfsPool, ZfsUnavailable, zfs_fuse_pool


@pytest.fixture(scope="module")
def zfs_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZfsPool]:
    """A real pool on a sparse file, its zfs-fuse daemon started here and
    stopped by pid afterwards; skipped with the reason where impossible."""
    try:
        with zfs_fuse_pool(tmp_path_factory.mktemp("zfs")) as pool:
            yield pool
    except ZfsUnavailable as exc:
        pytest.skip(reason=f"zfs-fuse unavailable: {exc}")
