"""The protocol's error model: whose fault each class says, one root, mapping."""

from __future__ import annotations

import pytest

from agentiso.protocol import errors as pe
from agentiso.protocol.codec import Codec
from agentiso.protocol.framing import FrameDecoder, encode_frame
from agentiso.protocol.helper import HelperRequest

PEER_BROKE_RULES = [pe.FramingError, pe.FrameTooLarge, pe.TruncatedFrame, pe.DecodeError,
                    pe.VersionMismatch, pe.UnexpectedMessage]


@pytest.mark.parametrize("cls", PEER_BROKE_RULES)
def test_what_the_peer_broke_is_a_remote_protocol_error(cls: type[Exception]) -> None:
    assert issubclass(cls, pe.RemoteProtocolError)
    assert not issubclass(cls, pe.LocalProtocolError)
    assert not issubclass(cls, pe.RemoteError)


def test_what_we_broke_is_a_local_protocol_error() -> None:
    assert issubclass(pe.OversizeMessage, pe.LocalProtocolError)
    assert not issubclass(pe.OversizeMessage, pe.RemoteProtocolError)
    with pytest.raises(pe.LocalProtocolError):
        encode_frame(b"x" * 11, 10)


@pytest.mark.parametrize("code", list(pe.ErrorCode))
def test_every_typed_answer_is_a_remote_error_with_its_code(code: pe.ErrorCode) -> None:
    err = pe.remote_error(code, "m")
    assert isinstance(err, pe.RemoteError) and err.code == code and err.message == "m"
    assert not isinstance(err, (pe.ProtocolError, pe.LocalProtocolError, pe.RemoteProtocolError))
    assert isinstance(err, pe.WireError)


def test_a_peer_reporting_our_protocol_violation_is_a_typed_answer() -> None:
    err = pe.remote_error("protocol", "window exceeded")
    assert isinstance(err, pe.ProtocolViolation) and isinstance(err, pe.RemoteError)
    assert not isinstance(err, pe.RemoteProtocolError)


def test_everything_the_package_raises_has_one_root() -> None:
    with pytest.raises(pe.WireError):
        FrameDecoder(10).feed(b"\xff\xff\xff\xff")
    with pytest.raises(pe.WireError):
        Codec[HelperRequest](HelperRequest).decode(b"\xc1")
    for cls in (pe.ProtocolError, pe.RemoteError, *PEER_BROKE_RULES):
        assert issubclass(cls, pe.WireError)


class _Closed(Exception):
    pass


def test_map_exceptions_translates_once_and_chains() -> None:
    mapping = {(BrokenPipeError, ConnectionResetError): _Closed,
               TimeoutError: lambda e: pe.RemoteTimeout(f"slow: {e}")}
    with pytest.raises(_Closed) as info, pe.map_exceptions(mapping):
        raise BrokenPipeError("gone")
    assert isinstance(info.value.__cause__, BrokenPipeError) and str(info.value) == "gone"
    with pytest.raises(pe.RemoteTimeout, match="slow: t"), pe.map_exceptions(mapping):
        raise TimeoutError("t")
    with pytest.raises(KeyError), pe.map_exceptions(mapping):  # unmatched: unchanged
        raise KeyError("k")
