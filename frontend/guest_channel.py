"""Open a workspace VM's guest agent through the helper.

The helper authenticates us, checks that the VM is ours, then turns the
connection into a relayed guest channel: from then on it carries the guest
protocol, spoken by :class:`~agentiso.frontend.guest_client.GuestClient`.

Usage::

    async with open_guest("/run/agentiso/helper.sock", "my-vm") as guest:
        result = await guest.exec(["uname", "-a"])
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.stapled import StapledByteStream

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import FrameTooLarge, ProtocolError, remote_error
from agentiso.protocol.framing import HEADER, encode_frame

from .guest_client import GuestClient
from .helper_client import HelperUnavailable


async def _read_one_frame(buffered: BufferedByteReceiveStream) -> hp.HelperResponse:
    """Read exactly one helper frame, leaving every later byte in ``buffered``
    (the guest stream that follows is not helper-framed)."""
    try:
        (length,) = HEADER.unpack(await buffered.receive_exactly(HEADER.size))
        if length > hp.HELPER_MAX_FRAME:
            raise FrameTooLarge(length, hp.HELPER_MAX_FRAME)
        body = await buffered.receive_exactly(length)
    except (anyio.IncompleteRead, anyio.EndOfStream):
        raise HelperUnavailable("the helper closed the connection") from None
    return hp.response_codec.decode(body)


async def _call(
    stream: anyio.abc.ByteStream, buffered: BufferedByteReceiveStream, msg: hp.HelperRequest
) -> hp.HelperResponse:
    await stream.send(encode_frame(hp.request_codec.encode(msg), hp.HELPER_MAX_FRAME))
    resp = await _read_one_frame(buffered)
    if isinstance(resp, hp.Error):
        raise remote_error(resp.code, resp.message)
    return resp


@asynccontextmanager
async def open_guest(
    helper_socket: str, vm: str, *, timeout: float = 30.0, owner: int | None = None
) -> AsyncIterator[GuestClient]:
    """A :class:`GuestClient` for VM ``vm`` over its own helper connection.

    ``owner`` (root only) opens another user's VM."""
    try:
        stream = await anyio.connect_unix(helper_socket)
    except OSError as exc:
        raise HelperUnavailable(
            f"cannot connect to the agentiso helper at {helper_socket}: {exc.strerror or exc}"
        ) from None
    async with stream:
        buffered = BufferedByteReceiveStream(stream)
        with anyio.fail_after(timeout):
            hello = await _call(
                stream, buffered,
                hp.Hello(id=1, version=hp.HELPER_PROTOCOL_VERSION, client="agentiso-guest"),
            )
            if not isinstance(hello, hp.HelloOk):
                raise ProtocolError(f"expected hello_ok, got {type(hello).__name__}")
            opened = await _call(stream, buffered, hp.GuestOpen(id=2, vm=vm, owner=owner))
            if not isinstance(opened, hp.GuestOpened):
                raise ProtocolError(f"expected guest_opened, got {type(opened).__name__}")
        joined = StapledByteStream(stream, buffered)
        async with GuestClient.connect(joined, hello_timeout=timeout) as guest:
            yield guest


__all__ = ["open_guest"]
