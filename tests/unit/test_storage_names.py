"""Names and sizes: every rule gets an input that tries to break it."""

from __future__ import annotations

import re

import msgspec
import pytest

from agentiso.privhelper.errors import HelperError
from agentiso.privhelper.storage import errors
from agentiso.privhelper.storage.names import MIB, check_name, check_size
from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.types import NAME_PATTERN, Name

GOOD = ["a", "0", "ws-1", "a" * 63, "abc-def-123", "9lives", "a--b", "x-"]
BAD = [
    "a/b", "..", ".", "../etc", "a\0b", "\0", "x" * 64, "x" * 300, "", "a;rm -rf /",
    "$(id)", "`id`", "a b", "a\tb", "a|b", "a&b", "a>b", "a*", "a?", "Upper", "-lead",
    "name\n", "\nname", "a@b", "a%b", "_hidden", "ä", "a.b", "a:b", "a,b", "🙂",
]  # fmt: skip


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert check_name("volume", name) == name


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(errors.InvalidName) as err:
        check_name("volume", name)
    assert err.value.code is ErrorCode.INVALID
    # The message shows the value escaped and bounded.
    assert "\0" not in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("value", [None, 1, b"ab", ["a"], 1.0])
def test_non_string_names_refused(value: object) -> None:
    with pytest.raises(errors.InvalidName):
        check_name("snapshot", value)


@pytest.mark.parametrize("name", GOOD + BAD, ids=repr)
def test_same_language_as_the_protocol(name: str) -> None:
    """The backend accepts exactly what the protocol's Name accepts (bar its '$' newline slack)."""
    try:
        msgspec.convert(name, Name)
        proto_ok = True
    except msgspec.ValidationError:
        proto_ok = False
    try:
        check_name("volume", name)
        ours = True
    except errors.InvalidName:
        ours = False
    if name.endswith("\n") and re.match(NAME_PATTERN, name):
        # Python's '$' accepts a trailing newline; we do not (defence in depth).
        assert not ours
    else:
        assert ours == proto_ok


@pytest.mark.parametrize(
    "size",
    [-1, 0, -(2**63), 2**63, 10**30, 1.5, float("nan"), True, False, "1G", None, 513, 100, MIB + 1],
    ids=repr,
)
def test_bad_sizes_refused(size: object) -> None:
    with pytest.raises(errors.InvalidSize) as err:
        check_size(size, minimum=MIB, maximum=2**40)
    assert err.value.code is ErrorCode.INVALID


def test_size_bounds() -> None:
    assert check_size(MIB, minimum=MIB, maximum=2 * MIB) == MIB
    assert check_size(2 * MIB, minimum=MIB, maximum=2 * MIB) == 2 * MIB
    with pytest.raises(errors.InvalidSize, match="minimum"):
        check_size(MIB - 512, minimum=MIB, maximum=2 * MIB)
    with pytest.raises(errors.InvalidSize, match="maximum"):
        check_size(2 * MIB + 512, minimum=MIB, maximum=2 * MIB)


def test_error_tree_and_codes() -> None:
    cases: list[tuple[errors.StorageError, ErrorCode]] = [
        (errors.InvalidName("volume", "x/y", "bad"), ErrorCode.INVALID),
        (errors.InvalidSize(-1, "bad"), ErrorCode.INVALID),
        (errors.NotFound("volume", "v"), ErrorCode.NOT_FOUND),
        (errors.AlreadyExists("volume", "v"), ErrorCode.ALREADY_EXISTS),
        (errors.HasDependents("snapshot", "v@s", ["b", "a"]), ErrorCode.CONFLICT),
        (errors.VolumeBusy("v", "rollback"), ErrorCode.CONFLICT),
        (errors.BackendUnavailable("no pool"), ErrorCode.UNAVAILABLE),
        (errors.CommandFailed(["zfs", "destroy", "x"], 1, "boom\nreason"), ErrorCode.INTERNAL),
        (errors.CorruptState("bad json"), ErrorCode.INTERNAL),
    ]
    for exc, code in cases:
        assert isinstance(exc, errors.StorageError)
        assert isinstance(exc, HelperError)  # the one root that carries the wire code
        assert exc.code is code
        assert exc.message
    dep = errors.HasDependents("snapshot", "v@s", ["b", "a"])
    assert dep.dependents == ("a", "b")
    failed = errors.CommandFailed(["zfs", "destroy", "x"], 1, "boom\nreason")
    assert failed.stderr == "boom\nreason" and "reason" in failed.message
