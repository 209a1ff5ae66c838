"""Every patterned string field of both protocols refuses a trailing newline.

Python's ``$`` matches before a final ``\\n``, so ``^name$`` let ``"name\\n"``
through; patterns are anchored with ``\\A...\\Z`` instead.  The fields are found
from the message structs' annotations (both unions, nested structs, lists,
dict keys and values, optionals), so a new field is covered as soon as it is
declared; a new *pattern* needs a valid example below, or this test fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
import msgspec.inspect as mi
import pytest
from msgspec import Meta

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import DecodeError

#: A valid value for each pattern in use.
EXAMPLES: dict[str, str] = {
    r"\A[a-z0-9][a-z0-9-]{0,62}\Z": "vm-1",
    r"\A[0-9a-fA-F.:]+(/[0-9]{1,3})?\Z": "10.42.0.0/16",
    r"\A/[^\x00]*\Z": "/root/file",
    r"\A[^\x00]*\Z": "echo hi",
    r"\A[A-Za-z_][A-Za-z0-9_]*\Z": "PATH",
    r"\A[0-9a-f]{64}\Z": "0" * 64,
    r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z": "ws-1.example",
    r"\A[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z": "52:54:00:12:34:56",
    r"\A[0-9a-fA-F.:]+\Z": "10.42.0.7",
    r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*\Z": "eth0",
    r"\A[A-Za-z0-9.-]+\Z": "example.org",
    r"\A[0-9a-f]{32}\Z": "0123456789abcdef" * 2,
}

#: Patterns for free text in which a newline is content, not a hole: paths,
#: argv elements, shell scripts and env values may hold newlines anywhere
#: (only NUL is refused), so a trailing one is accepted like any other.
NEWLINE_IS_CONTENT = {r"\A/[^\x00]*\Z", r"\A[^\x00]*\Z"}


def _walk(t: mi.Type, seen: set[type]) -> Iterator[mi.StrType]:
    if isinstance(t, mi.StrType):
        if t.pattern is not None:
            yield t
    elif isinstance(t, mi.StructType):
        if t.cls in seen:
            return
        seen.add(t.cls)
        for f in t.fields:
            yield from _walk(f.type, seen)
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            yield from _walk(member, seen)
    elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        yield from _walk(t.item_type, seen)
    elif isinstance(t, mi.DictType):
        yield from _walk(t.key_type, seen)
        yield from _walk(t.value_type, seen)
    elif isinstance(t, mi.TupleType):
        for item in t.item_types:
            yield from _walk(item, seen)


def _patterned_fields() -> dict[str, mi.StrType]:
    """Every patterned string type in both protocols, keyed by a readable id."""
    found: dict[str, mi.StrType] = {}
    for union in (gp.GuestRequest, gp.GuestResponse, hp.HelperRequest, hp.HelperResponse):
        for member in mi.type_info(union).types:  # type: ignore[attr-defined]
            for f in member.fields:
                for s in _walk(f.type, set()):
                    found.setdefault(f"{member.cls.__name__}.{f.name}:{s.pattern}", s)
    return found


FIELDS = _patterned_fields()


def _as_type(s: mi.StrType) -> Any:
    return Annotated[str, Meta(pattern=s.pattern, min_length=s.min_length,
                               max_length=s.max_length)]


def test_the_walk_finds_the_fields_the_issue_names() -> None:
    names = {k.split(":")[0] for k in FIELDS}
    assert {"SetHostname.hostname", "SetEnv.set", "SetEnv.unset", "ConfigureNetwork.search",
            "ConfigureNetwork.mac", "Exec.env"} <= names
    assert any(n.startswith("VmStart.") for n in names)  # the helper protocol too


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_trailing_newline_is_refused(field: str) -> None:
    s = FIELDS[field]
    assert s.pattern is not None
    assert s.pattern.startswith(r"\A") and s.pattern.endswith(r"\Z"), "anchor with \\A...\\Z"
    example = EXAMPLES.get(s.pattern)
    assert example is not None, f"add a valid example for the new pattern {s.pattern!r}"
    typ = _as_type(s)
    assert msgspec.convert(example, typ) == example
    if s.pattern in NEWLINE_IS_CONTENT:
        assert re.search(s.pattern, example + "\nmore")  # a newline anywhere is content here
        return
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(example + "\n", typ)


def test_a_trailing_newline_is_refused_in_a_whole_message() -> None:
    for bad in ({"type": "set_hostname", "id": 1, "hostname": "ws-1\n"},
                {"type": "set_env", "id": 1, "set": {"A\n": "x"}},
                {"type": "configure_network", "id": 1, "address": "10.0.0.2", "prefix": 24,
                 "interface": "eth0", "search": ["example.org\n"]}):
        with pytest.raises(DecodeError):
            gp.request_codec.decode(msgspec.msgpack.encode(bad))
