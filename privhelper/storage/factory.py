"""Choose and build the configured backend (no I/O until ``setup()``)."""

from __future__ import annotations

from pathlib import Path

from .backend import VolumeBackend
from .config import StorageConfig
from .qcow2 import Qcow2Backend
from .runner import Runner
from .zfs import ZfsBackend

#: Below the helper's state directory; the qcow2 backend keeps everything here.
STORAGE_SUBDIR = "storage"


def make_backend(config: StorageConfig, state_dir: Path) -> VolumeBackend:
    runner = Runner(config.command_timeout_s)
    lo, hi = config.min_volume_bytes, config.max_volume_bytes
    if config.backend == "zfs":
        return ZfsBackend(
            config.zfs, runner=runner, min_size=lo, max_size=hi,
            reserve_free_bytes=config.reserve_free_bytes,
        )
    root = Path(state_dir) / STORAGE_SUBDIR / "qcow2"
    return Qcow2Backend(
        root, runner=runner, min_size=lo, max_size=hi,
        reserve_free_bytes=config.reserve_free_bytes,
    )
