"""Pure chain logic of the qcow2 backend."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.storage.errors import CorruptState, HasDependents, NotFound
from agentiso.privhelper.storage.qcow2_state import (
    METADATA_VERSION,
    Layout,
    SnapshotRecord,
    VolumeMeta,
    base_dependents,
    decode_meta,
    encode_meta,
    layer_users,
    next_seq,
    owned_layers,
    plan_delete_snapshot,
    plan_rollback,
    snapshot_dependents,
    unreferenced,
)

G = 1 << 30
# Layer ids as the backend makes them (24 hex digits).
_L1, _L2, _T, _C, _N, _X = (c * 24 for c in "abcdef")


def vol(
    name: str, chain: list[str], snaps: dict[str, str] | None = None, seq: int = 1
) -> VolumeMeta:
    return VolumeMeta(
        version=METADATA_VERSION,
        name=name,
        base="minimal",
        origin="base:minimal",
        seq=seq,
        virtual_size=G,
        chain=chain,
        snapshots=[SnapshotRecord(n, lay, G) for n, lay in (snaps or {}).items()],
    )


# v: base <- L1 (s1) <- L2 (s2) <- T ; c: clone of v@s1: L1 <- C
V = vol("v", [_L1, _L2, _T], {"s1": _L1, "s2": _L2}, seq=1)
C = vol("c", [_L1, _C], seq=2)


def test_layout_paths_are_under_root_and_use_ids() -> None:
    lay = Layout(Path("/state/storage/qcow2"))
    assert lay.base("minimal") == Path("/state/storage/qcow2/images/minimal.qcow2")
    assert lay.layer("abc") == Path("/state/storage/qcow2/layers/abc.qcow2")
    assert lay.meta("ws") == Path("/state/storage/qcow2/volumes/ws.json")
    assert lay.backing_of(V, 0) == lay.base("minimal")
    assert lay.backing_of(V, 2) == lay.layer(_L2)


def test_meta_round_trip_and_corruption() -> None:
    assert decode_meta(encode_meta(V), "v.json") == V
    for bad in (b"", b"{", b"[]", b'{"version": 1}', encode_meta(V).replace(b'"seq"', b'"sneq"')):
        with pytest.raises(CorruptState):
            decode_meta(bad, "v.json")
    with pytest.raises(CorruptState):
        decode_meta(encode_meta(msgspec.structs.replace(V, version=99)), "v.json")
    with pytest.raises(CorruptState):
        decode_meta(encode_meta(msgspec.structs.replace(V, chain=[])), "v.json")


@pytest.mark.parametrize(
    "change",
    [
        {"chain": ["../../etc/passwd", _T]},
        {"chain": [_L1, _L1, _T]},
        {"chain": [_L1.upper(), _L2, _T]},
        {"name": "../x"},
        {"base": "a/b"},
        {"snapshots": [SnapshotRecord("s;1", _L1, G)]},
        {"snapshots": [SnapshotRecord("s1", _X, G)]},  # layer not in the chain
        {"snapshots": [SnapshotRecord("s1", _T, G)]},  # the top is not a snapshot
    ],
    ids=repr,
)
def test_tampered_metadata_refused(change: dict[str, object]) -> None:
    """Ids and names in the metadata become paths: a tampered file is refused."""
    bad = msgspec.structs.replace(V, **change)
    with pytest.raises(CorruptState):
        decode_meta(encode_meta(bad), "v.json")


def test_dependents_and_ownership() -> None:
    assert snapshot_dependents(V, "s1", [V, C]) == ["c"]
    assert snapshot_dependents(V, "s2", [V, C]) == []
    with pytest.raises(NotFound):
        snapshot_dependents(V, "nope", [V, C])
    users = layer_users([C, V])
    assert [m.name for m in users[_L1]] == ["v", "c"]  # oldest first
    assert owned_layers(V, users) == [_L1, _L2, _T]
    assert owned_layers(C, users) == [_C]
    # Once v is gone, c (the oldest remaining user) owns the shared layer.
    assert owned_layers(C, layer_users([C])) == [_L1, _C]
    assert base_dependents("minimal", [V, C]) == ["c", "v"]
    assert next_seq([V, C]) == 3 and next_seq([]) == 1
    assert unreferenced([_L1, _L2, _T, _X], [C]) == [_L2, _T, _X]


def test_rollback_drops_later_snapshots_and_top() -> None:
    plan = plan_rollback(V, "s2", _N, [V])
    assert plan.meta.chain == [_L1, _L2, _N]
    assert [s.name for s in plan.meta.snapshots] == ["s1", "s2"]
    assert plan.dropped == (_T,)
    plan = plan_rollback(V, "s1", _N, [V])
    assert plan.meta.chain == [_L1, _N]
    assert [s.name for s in plan.meta.snapshots] == ["s1"]
    assert plan.dropped == (_L2, _T)


def test_rollback_restores_snapshot_size() -> None:
    grown = msgspec.structs.replace(V, virtual_size=2 * G)
    assert plan_rollback(grown, "s1", _N, [grown]).meta.virtual_size == G


def test_rollback_refused_when_a_dropped_layer_is_shared() -> None:
    c2 = vol("c2", [_L1, _L2, _X], seq=3)  # clone of v@s2
    with pytest.raises(HasDependents) as err:
        plan_rollback(V, "s1", _N, [V, c2])
    assert err.value.dependents == ("c2",)
    # Rolling back to s2 keeps L2: allowed.
    assert plan_rollback(V, "s2", _N, [V, c2]).dropped == (_T,)


def test_delete_snapshot_merges_into_child() -> None:
    plan = plan_delete_snapshot(V, "s2", [V])
    assert (plan.layer, plan.child, plan.child_index) == (_L2, _T, 1)
    assert plan.meta.chain == [_L1, _T]
    assert [s.name for s in plan.meta.snapshots] == ["s1"]
    plan = plan_delete_snapshot(V, "s1", [V])
    assert (plan.layer, plan.child, plan.child_index) == (_L1, _L2, 0)


def test_delete_snapshot_refused_with_dependents() -> None:
    with pytest.raises(HasDependents) as err:
        plan_delete_snapshot(V, "s1", [V, C])
    assert err.value.dependents == ("c",)
    with pytest.raises(NotFound):
        plan_delete_snapshot(V, "zz", [V])


def test_corrupt_snapshot_on_top_detected() -> None:
    broken = vol("b", [_L1], {"s1": _L1})
    with pytest.raises(CorruptState):
        plan_delete_snapshot(broken, "s1", [broken])
