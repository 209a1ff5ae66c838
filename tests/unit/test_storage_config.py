"""The [storage] config section and backend selection."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.storage import StorageConfig, ZfsConfig, make_backend
from agentiso.privhelper.storage.errors import CorruptState
from agentiso.privhelper.storage.qcow2 import Qcow2Backend
from agentiso.privhelper.storage.qemu_img import is_lock_error, parse_info
from agentiso.privhelper.storage.zfs import ZfsBackend


def load(text: str) -> StorageConfig:
    return msgspec.convert(tomllib.loads(text), StorageConfig)


def test_defaults_are_qcow2() -> None:
    cfg = StorageConfig()
    assert cfg.backend == "qcow2"
    b = make_backend(cfg, Path("/var/lib/agentiso"))
    assert isinstance(b, Qcow2Backend)
    assert b.layout.root == Path("/var/lib/agentiso/storage/qcow2")


def test_zfs_selected() -> None:
    cfg = load('backend = "zfs"\n[zfs]\ndataset = "tank/ai"\nzvols = false\n')
    b = make_backend(cfg, Path("/x"))
    assert isinstance(b, ZfsBackend)
    assert b.ds.images == "tank/ai/images" and b.config.zvols is False
    assert ZfsConfig().compression == "lz4"


@pytest.mark.parametrize(
    "text",
    [
        'backend = "btrfs"',
        "typo = 1",
        "min_volume_bytes = -1",
        "max_volume_bytes = 0",
        '[zfs]\ndataset = "tank/a@b"',
        '[zfs]\ndataset = "/tank"',
        '[zfs]\ndataset = "tank/a b"',
        '[zfs]\ndataset = "tank/$(id)"',
        '[zfs]\ndataset = ""',
        '[zfs]\ncompression = "lz4; rm"',
        "[zfs]\nvolblocksize = 1",
        "command_timeout_s = 0",
    ],
)
def test_bad_config_refused(text: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        load(text)


def test_parse_qemu_img_info() -> None:
    info = parse_info(
        '{"virtual-size": 1024, "filename": "/a", "format": "qcow2", "actual-size": 4096,'
        ' "backing-filename": "/b", "backing-filename-format": "qcow2", "dirty-flag": false}'
    )
    assert (info.virtual_size, info.format, info.backing_filename) == (1024, "qcow2", "/b")
    with pytest.raises(CorruptState):
        parse_info("not json")
    assert is_lock_error(
        'qemu-img: Failed to get "write" lock\nIs another process using the image?'
    )
    assert not is_lock_error("No such file or directory")


def test_zvol_sizes_round_up_to_the_block_size() -> None:
    b = ZfsBackend(ZfsConfig(volblocksize=16384))
    assert b._zvol_size(16384) == 16384
    assert b._zvol_size(16384 + 512) == 32768
    assert b._zvol_size(461373440) == 461373440  # the minimal rootfs: already aligned
