"""Wire types and codecs shared by every agentiso process (DESIGN §3).

Only the standard library and msgspec may be imported here.
"""

from .errors import ErrorCode, ProtocolError, RemoteError
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ErrorCode",
    "FrameDecoder",
    "ProtocolError",
    "RemoteError",
    "encode_frame",
]
