"""Pure logic of the ZFS backend: layout, ``zfs get`` parsing, promotion plans."""

from __future__ import annotations

import pytest

from agentiso.privhelper.storage.zfs_state import (
    Datasets,
    clones_of,
    int_prop,
    is_hidden,
    later_snapshot_dependents,
    parse_get,
    plan_promotion,
    snapshots_of,
)

D = Datasets("tank/agentiso")


def test_layout() -> None:
    assert D.pool == "tank"
    assert D.base("minimal") == "tank/agentiso/images/minimal"
    assert D.base_origin("minimal") == "tank/agentiso/images/minimal@base"
    assert D.volume("ws") == "tank/agentiso/volumes/ws"
    assert D.snapshot("ws", "s1") == "tank/agentiso/volumes/ws@s1"
    assert D.probe.rsplit("/", 1)[1].startswith("_")


@pytest.mark.parametrize(
    ("dataset", "volume"),
    [
        ("tank/agentiso/volumes/ws", "ws"),
        ("tank/agentiso/volumes/ws@s1", None),
        ("tank/agentiso/volumes/ws/sub", None),
        ("tank/agentiso/volumes", None),
        ("tank/agentiso/images/ws", None),
        ("tank/other/volumes/ws", None),
    ],
)
def test_volume_name(dataset: str, volume: str | None) -> None:
    assert D.volume_name(dataset) == volume


def test_origin_label() -> None:
    assert D.origin_label("tank/agentiso/images/minimal@base") == "base:minimal"
    assert D.origin_label("tank/agentiso/volumes/a@s1") == "snapshot:a@s1"
    assert D.origin_label("-") == "none"


OUT = "\n".join(
    [
        "tank/agentiso/volumes/a\ttype\tfilesystem",
        "tank/agentiso/volumes/a\tused\t1048576",
        "tank/agentiso/volumes/a\torigin\ttank/agentiso/images/minimal@base",
        "tank/agentiso/volumes/a@s1\ttype\tsnapshot",
        "tank/agentiso/volumes/a@s1\tused\t4096",
        "tank/agentiso/volumes/a@s2\ttype\tsnapshot",
        "tank/agentiso/volumes/a@s3\ttype\tsnapshot",
        "tank/agentiso/volumes/b\ttype\tfilesystem",
        "tank/agentiso/volumes/b\torigin\ttank/agentiso/volumes/a@s1",
        "tank/agentiso/volumes/c\ttype\tfilesystem",
        "tank/agentiso/volumes/c\torigin\ttank/agentiso/volumes/a@s2",
        "tank/agentiso/volumes/c@s1\ttype\tsnapshot",
        "garbage line without tabs",
        "",
    ]
)


def test_parse_get_keeps_order_and_skips_garbage() -> None:
    props = parse_get(OUT)
    assert next(iter(props)) == "tank/agentiso/volumes/a"
    assert snapshots_of(props, "tank/agentiso/volumes/a") == ["s1", "s2", "s3"]
    assert snapshots_of(props, "tank/agentiso/volumes/c") == ["s1"]
    assert int_prop(props, "tank/agentiso/volumes/a", "used") == 1048576
    assert int_prop(props, "tank/agentiso/volumes/a", "volsize") == 0
    assert int_prop(props, "nope", "used") == 0
    assert clones_of(props, "tank/agentiso/volumes/a@s1") == ["tank/agentiso/volumes/b"]


def test_promotion_plan_promotes_the_newest_dependent() -> None:
    props = parse_get(OUT)
    step = plan_promotion(props, "tank/agentiso/volumes/a")
    assert step is not None
    assert step.clone == "tank/agentiso/volumes/c"  # clone of s2, the newest with clones
    assert step.hide == ("s1", "s2")  # these move to c: hide them first
    assert plan_promotion(props, "tank/agentiso/volumes/b") is None


def test_promotion_does_not_rename_already_hidden() -> None:
    props = parse_get(
        "p/r/volumes/a@_orphan-1\ttype\tsnapshot\n"
        "p/r/volumes/a@s1\ttype\tsnapshot\n"
        "p/r/volumes/x\torigin\tp/r/volumes/a@s1\n"
    )
    step = plan_promotion(props, "p/r/volumes/a")
    assert step is not None and step.hide == ("s1",)
    assert is_hidden("_orphan-1") and not is_hidden("s1")


def test_later_snapshot_dependents() -> None:
    props = parse_get(OUT)
    assert later_snapshot_dependents(props, "tank/agentiso/volumes/a", "s1") == [
        "tank/agentiso/volumes/c"
    ]
    assert later_snapshot_dependents(props, "tank/agentiso/volumes/a", "s2") == []
