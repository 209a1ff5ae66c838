"""The host -> guest stream decoder in protocol/ (used by the agent and the relay):
frames and host sync markers, framing violations and resynchronisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import FrameTooLarge, FramingError, RemoteProtocolError
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.guest_stream import HostMarker, HostStreamDecoder, host_marker

items = st.lists(
    st.one_of(
        st.binary(max_size=100),
        st.binary(min_size=gp.SYNC_NONCE_LEN, max_size=gp.SYNC_NONCE_LEN).map(HostMarker),
    ),
    max_size=10,
)


def _encode(item: bytes | HostMarker) -> bytes:
    return item.encode() if isinstance(item, HostMarker) else encode_frame(item)


@given(items=items, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_yields_the_same_items(items: list[bytes | HostMarker], cuts: list[int]) -> None:
    stream = b"".join(_encode(i) for i in items)
    points = [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    dec, out, last = HostStreamDecoder(), [], 0
    for p in points:
        out += dec.feed(stream[last:p])
        last = p
    assert out == items
    assert not dec.mid_frame


@given(data=st.lists(st.binary(max_size=2000), max_size=8))
def test_garbage_gives_items_or_a_typed_error_with_bounded_memory(data: list[bytes]) -> None:
    dec = HostStreamDecoder(max_frame=1024)
    try:
        for d in data:
            dec.feed(d)
            assert len(dec._buf) <= 1024 + 4 + len(d)
    except RemoteProtocolError:
        pass


def test_wrong_marker_breaks_the_stream_until_resync() -> None:
    dec = HostStreamDecoder()
    with pytest.raises(FramingError):
        dec.feed(b"\xffNOT-THE-MAGIC-AT-ALL-------")
    with pytest.raises(FramingError):  # stays broken
        dec.feed(encode_frame(b"x"))
    dec.resync()
    assert dec.scanning and not dec.mid_frame
    assert dec.feed(encode_frame(b"lost") + host_marker(b"n" * 8) + encode_frame(b"ok")) == [
        HostMarker(b"n" * 8), b"ok"]
    assert not dec.scanning


def test_oversize_length_is_refused_before_the_body_and_resync_finds_a_later_marker() -> None:
    dec = HostStreamDecoder(max_frame=10)
    # The marker after the bad header, in the same read, is kept for the scan.
    with pytest.raises(FrameTooLarge) as info:
        dec.feed((11).to_bytes(4, "big") + b"body" + host_marker(b"m" * 8))
    assert info.value.length == 11
    dec.resync()
    assert dec.feed(b"") == [HostMarker(b"m" * 8)]


def test_resync_finds_a_marker_a_dead_frame_swallowed() -> None:
    # A host vanished mid-frame; the next host's marker went into that frame's body.
    dec = HostStreamDecoder()
    assert dec.feed((1000).to_bytes(4, "big") + b"partial" + host_marker(b"k" * 8)) == []
    assert dec.mid_frame and dec.pending_length == 1000
    dec.resync()
    assert dec.feed(b"") == [HostMarker(b"k" * 8)]


def test_scanning_keeps_memory_bounded_and_a_split_marker_is_found() -> None:
    dec = HostStreamDecoder()
    dec.resync()
    for _ in range(100):
        assert dec.feed(b"z" * 1000) == []
        assert len(dec._buf) < len(gp.HOST_SYNC_MAGIC)
    marker = host_marker(b"s" * 8)
    assert dec.feed(marker[:5]) == []
    assert dec.feed(marker[5:] + encode_frame(b"f")) == [HostMarker(b"s" * 8), b"f"]


def test_max_frame_may_change_between_items() -> None:
    # The agent reads a small Auth frame first, then raises the limit.
    dec = HostStreamDecoder(max_frame=gp.AUTH_MAX_FRAME)
    dec.receive_data(encode_frame(b"auth") + encode_frame(b"x" * 10_000))
    assert dec.next_item() == b"auth"
    dec.max_frame = gp.GUEST_MAX_FRAME
    assert dec.next_item() == b"x" * 10_000
    assert dec.next_item() is None


def test_marker_nonce_has_a_fixed_length() -> None:
    with pytest.raises(ValueError):
        host_marker(b"short")
