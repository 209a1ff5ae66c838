"""Messages between the frontend (client) and the root helper (server).

Conversation::

    client connects
    helper checks SO_PEERCRED; if refused: Error(id=0, permission_denied), close
    client -> Hello(id, version)       helper -> HelloOk(id, ...) | Error(version_mismatch)
    then any number of requests, concurrently; each response carries its request's id.

Every struct forbids unknown fields and every field is bounded (see
:mod:`agentiso.protocol.types`).
"""

from __future__ import annotations

import msgspec

from .codec import Codec
from .errors import ErrorCode
from .types import Label, ProtocolVersion, RequestId, ShortText, Uid

#: Bump on any incompatible change to this module's messages.
HELPER_PROTOCOL_VERSION = 1

#: Largest frame either side accepts on the helper socket.
HELPER_MAX_FRAME = 4 * 1024 * 1024


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    id: RequestId


# --- requests (client -> helper) -----------------------------------------------------


class Hello(_Msg, tag="hello"):
    """First request of every connection."""

    version: ProtocolVersion
    client: Label = ""


class Ping(_Msg, tag="ping"):
    pass


class WhoAmI(_Msg, tag="whoami"):
    """Ask how the helper sees us (uid/gid/pid from SO_PEERCRED)."""


HelperRequest = Hello | Ping | WhoAmI


# --- responses (helper -> client) ----------------------------------------------------


class HelloOk(_Msg, tag="hello_ok"):
    version: ProtocolVersion
    server: Label
    uptime_s: float


class Pong(_Msg, tag="pong"):
    pass


class Identity(_Msg, tag="identity"):
    uid: Uid
    gid: Uid
    pid: Uid
    admin: bool


class Error(_Msg, tag="error"):
    """A typed failure of request ``id`` (0: of the connection as a whole)."""

    code: ErrorCode
    message: ShortText


HelperResponse = HelloOk | Pong | Identity | Error

request_codec: Codec[HelperRequest] = Codec(HelperRequest)
response_codec: Codec[HelperResponse] = Codec(HelperResponse)
