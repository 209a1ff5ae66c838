"""The relay's decoder of what a client sends: frames and host sync markers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentiso.privhelper.hoststream import HostStreamDecoder, SyncMarker
from agentiso.protocol import guest as gp
from agentiso.protocol.errors import ProtocolError
from agentiso.protocol.framing import encode_frame

items = st.lists(
    st.one_of(
        st.binary(max_size=100),
        st.binary(min_size=gp.SYNC_NONCE_LEN, max_size=gp.SYNC_NONCE_LEN).map(SyncMarker),
    ),
    max_size=10,
)


def _encode(item: bytes | SyncMarker) -> bytes:
    if isinstance(item, SyncMarker):
        return gp.HOST_SYNC_MAGIC + item.nonce
    return encode_frame(item)


@given(items=items, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_yields_the_same_items(items: list[bytes | SyncMarker], cuts: list[int]) -> None:
    stream = b"".join(_encode(i) for i in items)
    points = [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    dec, out, last = HostStreamDecoder(), [], 0
    for p in points:
        out += dec.feed(stream[last:p])
        last = p
    assert out == items


@given(data=st.lists(st.binary(max_size=2000), max_size=8))
def test_garbage_gives_items_or_a_typed_error(data: list[bytes]) -> None:
    dec = HostStreamDecoder(max_frame=1024)
    try:
        for d in data:
            dec.feed(d)
    except ProtocolError:
        pass


def test_wrong_marker_is_a_framing_error() -> None:
    with pytest.raises(ProtocolError):
        HostStreamDecoder().feed(b"\xffNOT-THE-MAGIC-AT-ALL-------")
