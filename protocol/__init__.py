"""Wire types and codecs shared by every agentiso process.

Only the standard library and msgspec may be imported here.
"""

from .errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    WireError,
)
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ErrorCode",
    "FrameDecoder",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "WireError",
    "encode_frame",
]
