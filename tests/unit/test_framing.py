"""The frame codec: round trips, arbitrary splits, hostile bytes, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentiso.protocol.errors import (
    FrameTooLarge,
    LocalProtocolError,
    OversizeMessage,
    ProtocolError,
    TruncatedFrame,
)
from agentiso.protocol.framing import HEADER, FrameDecoder, encode_frame

LIMIT = 1024


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(
    bodies=st.lists(st.binary(max_size=LIMIT), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_any_split_of_a_valid_stream_yields_the_same_frames(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(b, LIMIT) for b in bodies)
    dec = FrameDecoder(LIMIT)
    out: list[bytes] = []
    for piece in _split(stream, cuts):
        out.extend(dec.feed(piece))
    dec.close()
    assert out == bodies
    assert dec.buffered == 0


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=3000), max_size=10))
def test_random_bytes_give_frames_or_a_typed_error_with_bounded_buffer(
    chunks: list[bytes],
) -> None:
    dec = FrameDecoder(LIMIT)
    biggest_feed = max((len(c) for c in chunks), default=0)
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert len(frame) <= LIMIT
            # Never more than one frame (+ header) plus what just arrived.
            assert dec.buffered <= LIMIT + HEADER.size + biggest_feed
        dec.close()
    except ProtocolError:
        pass  # FrameTooLarge / TruncatedFrame: typed, expected for garbage


def test_oversize_length_is_refused_before_the_body_arrives() -> None:
    dec = FrameDecoder(LIMIT)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(HEADER.pack(LIMIT + 1))
    assert info.value.length == LIMIT + 1
    assert dec.buffered == 0
    with pytest.raises(FrameTooLarge):  # the stream stays dead
        dec.feed(b"\0\0\0\0")


def test_huge_length_prefix_allocates_nothing() -> None:
    dec = FrameDecoder(LIMIT)
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\xff\xff\xff\xff" + b"x" * 10)
    assert dec.buffered == 0


def test_truncated_frame_is_reported_at_eof() -> None:
    dec = FrameDecoder(LIMIT)
    assert dec.feed(encode_frame(b"hello", LIMIT)[:-2]) == []
    with pytest.raises(TruncatedFrame):
        dec.close()


def test_truncated_header_is_reported_at_eof() -> None:
    dec = FrameDecoder(LIMIT)
    dec.feed(b"\0\0")
    with pytest.raises(TruncatedFrame):
        dec.close()


def test_empty_frame_round_trips() -> None:
    dec = FrameDecoder(LIMIT)
    assert dec.feed(encode_frame(b"", LIMIT) * 3) == [b"", b"", b""]


def test_sender_refuses_to_encode_an_oversize_frame() -> None:
    # Our own fault, found before sending: the local side of the error model.
    with pytest.raises(OversizeMessage) as info:
        encode_frame(b"x" * (LIMIT + 1), LIMIT)
    assert isinstance(info.value, LocalProtocolError)
    assert (info.value.length, info.value.limit) == (LIMIT + 1, LIMIT)


def test_frame_at_exactly_the_limit_is_accepted() -> None:
    dec = FrameDecoder(LIMIT)
    assert dec.feed(encode_frame(b"y" * LIMIT, LIMIT)) == [b"y" * LIMIT]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(0)


@given(
    bodies=st.lists(st.binary(max_size=50), min_size=1, max_size=5),
    partial=st.binary(max_size=30),
    keep=st.integers(min_value=0),
    cut=st.integers(min_value=0),
)
def test_detach_returns_every_unread_byte_in_order(
    bodies: list[bytes], partial: bytes, keep: int, cut: int
) -> None:
    import anyio

    from agentiso.protocol.stream import FrameReader

    tail_frame = encode_frame(partial, LIMIT)
    tail = tail_frame[: keep % len(tail_frame)]  # a frame cut short
    stream = b"".join(encode_frame(b, LIMIT) for b in bodies) + tail
    split = 1 + cut % len(stream)  # an empty read would mean EOF
    chunks = [stream[:split], stream[split:]]
    received = bytearray()

    async def run() -> tuple[bytes | None, bytes]:
        async def receive() -> bytes:
            data = chunks.pop(0) if chunks else b""
            received.extend(data)
            return data

        reader = FrameReader(receive, LIMIT)
        return await reader.read(), reader.detach()

    first, rest = anyio.run(run)
    assert first == bodies[0]
    assert encode_frame(first, LIMIT) + rest == bytes(received)


def test_frame_length_checks_the_limit_before_the_body_is_read() -> None:
    from agentiso.protocol.errors import FrameTooLarge
    from agentiso.protocol.framing import HEADER, frame_length

    assert frame_length(HEADER.pack(10), 100) == 10
    assert frame_length(HEADER.pack(100), 100) == 100
    with pytest.raises(FrameTooLarge):
        frame_length(HEADER.pack(101), 100)
    with pytest.raises(ValueError):
        frame_length(b"\x00\x00", 100)
