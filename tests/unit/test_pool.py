"""The warm pool's pure parts (privhelper/vms/pool.py): names, the fill
plan, a take-over's registry change and its undo, and ``[pool]``'s config."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.config import PoolShape, parse_config
from agentiso.privhelper.errors import ConfigError
from agentiso.privhelper.registry import Registry
from agentiso.privhelper.vms.pool import Want, _Handover, key_of, next_fill, pool_name
from agentiso.privhelper.vms.templates import POOL_OWNER, ram_holder
from agentiso.protocol import helper as hp

KEY_A, KEY_B = "0123456789abcdef", "fedcba9876543210"


def test_a_pool_name_carries_its_template_key() -> None:
    name = pool_name(KEY_A, "00ff00ff")
    assert name == f"pool-{KEY_A}-00ff00ff"
    assert key_of(name) == KEY_A
    assert msgspec.convert({"name": name}, type=_NameHolder).name == name  # a wire Name
    for other in ("pool-x", f"pool-{KEY_A}", f"tpl-{KEY_A}", f"pool-{KEY_A}-00ff00ff\n",
                  f"pool-{KEY_A.upper()}-00ff00ff", "a1"):
        assert key_of(other) is None, other


class _NameHolder(msgspec.Struct):
    name: hp.Name


def want(key: str, count: int, memory_mib: int = 256) -> Want:
    return Want(PoolShape(count=count, memory_mib=memory_mib), key)


def test_the_fill_plan_keeps_the_order_the_counts_and_the_budget() -> None:
    wants = [want(KEY_A, 2), want(KEY_B, 1, memory_mib=512)]
    assert next_fill(wants, {}, 0, 2048) == wants[0]
    assert next_fill(wants, {KEY_A: 1}, 256, 2048) == wants[0]
    assert next_fill(wants, {KEY_A: 2}, 512, 2048) == wants[1]
    assert next_fill(wants, {KEY_A: 2, KEY_B: 1}, 1024, 2048) is None  # full
    # The budget: B's 512 MiB does not fit beside 1600 MiB used; A's 256 does.
    assert next_fill(wants, {KEY_A: 1}, 1600, 2048) == wants[0]
    assert next_fill(wants, {KEY_A: 2}, 1600, 2048) is None
    assert next_fill(wants, {}, 0, 0) is None  # no budget, no pool
    assert next_fill([want(KEY_A, 0)], {}, 0, 2048) is None  # count 0


def test_a_pool_vm_maps_a_ram_copy_of_its_own() -> None:
    reg = Registry(Path("/nonexistent"))
    user = reg.add_volume(1000, "ws", "image:minimal", 1 << 30, "minimal")
    p1 = reg.add_volume(POOL_OWNER, pool_name(KEY_A, "00000001"), "image:minimal", 1 << 30)
    p2 = reg.add_volume(POOL_OWNER, pool_name(KEY_A, "00000002"), "image:minimal", 1 << 30)
    assert ram_holder(user) == 1000
    assert ram_holder(p1) < 0 and ram_holder(p2) < 0  # no uid is negative
    assert ram_holder(p1) != ram_holder(p2)
    assert ram_holder(p1) == ram_holder(p1)


def test_a_takeover_gives_vm_and_disk_to_the_caller_and_its_undo_gives_them_back() -> None:
    reg = Registry(Path("/nonexistent"))
    ws = _Ws(reg)
    user_vol = reg.add_volume(1000, "ws", "image:minimal", 1 << 30, "minimal")
    name = pool_name(KEY_A, "0000abcd")
    pool_vol = reg.add_volume(POOL_OWNER, name, "image:minimal", 1 << 30, "minimal")
    rec = reg.add_vm(POOL_OWNER, name, pool_vol.key, 1, 256)
    limits = hp.TimeLimits(idle_s=60)
    req = hp.VmStart(id=0, name="box", volume="ws", time_limits=limits)
    h = _Handover(rec=rec, pool_vol=pool_vol, user_vol=user_vol, pool_name=name)
    h.apply(ws, req)  # type: ignore[arg-type]
    assert reg.vm(1000, "box") is rec and rec.volume_key == pool_vol.key
    assert rec.time_limits == limits
    assert reg.volume(1000, "ws") is pool_vol
    assert pool_vol.created == user_vol.created
    assert [v.key for v in reg.volumes()] == [pool_vol.key]  # the fresh one set aside
    assert reg.vms(POOL_OWNER) == [] and reg.volumes(POOL_OWNER) == []
    h.revert_volume(ws)  # type: ignore[arg-type]
    assert reg.volume(1000, "ws") is user_vol
    assert reg.volume(POOL_OWNER, name) is pool_vol
    h.revert_volume(ws)  # type: ignore[arg-type]
    assert len(reg.volumes()) == 2  # twice is once


class _Ws:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry


def test_pool_config() -> None:
    cfg = parse_config("[pool]\nmemory_mib = 1024\n"
                       "[[pool.shapes]]\nimage = \"minimal\"\ncount = 2\n"
                       "[[pool.shapes]]\nimage = \"dev\"\nvcpus = 2\nmemory_mib = 512\n")
    assert cfg.pool.memory_mib == 1024
    assert [(s.image, s.vcpus, s.memory_mib, s.count) for s in cfg.pool.shapes] == [
        ("minimal", 1, 256, 2), ("dev", 2, 512, 1)]
    assert parse_config("").pool.shapes == []  # none by default
    for bad in ("[pool]\nmemory_mib = -1\n", "[pool]\nsize = 3\n",
                "[[pool.shapes]]\ncount = 65\n", "[[pool.shapes]]\nvcpus = 0\n",
                "[[pool.shapes]]\nmemory_mib = 8\n", "[[pool.shapes]]\nimage = \"../x\"\n",
                "[[pool.shapes]]\nimage = \"minimal\\n\"\n", "[[pool.shapes]]\nkind = 1\n"):
        with pytest.raises(ConfigError):
            parse_config(bad)
