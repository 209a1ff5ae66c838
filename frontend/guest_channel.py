"""Open a workspace VM's guest agent through the helper.

The helper authenticates us, checks that the VM is ours, then turns the
connection into a relayed guest channel: from then on it carries the guest
protocol, spoken by :class:`~agentiso.frontend.guest_client.GuestClient`.

Usage::

    async with open_guest("/run/agentiso/helper.sock", "my-vm") as guest:
        result = await guest.exec(["uname", "-a"])

Errors while opening (never a raw TimeoutError or OSError):

* :class:`~agentiso.frontend.errors.HelperUnavailable` — the helper cannot
  be reached or greeted;
* the helper's typed refusal of ``GuestOpen``: ``NotFound`` (no such VM of
  yours), ``Unavailable`` (the VM is not running), ``PermissionDenied``;
* :class:`~agentiso.frontend.errors.RequestTimeout` — the helper did not
  answer ``GuestOpen``, or the agent sent no Hello, within ``timeout``.

Once open, the GuestClient's errors apply; a closed relay is
:class:`~agentiso.frontend.errors.ConnectionLost` with hop ``helper relay``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import UnexpectedMessage

from .errors import Hop
from .guest_client import GuestClient
from .helper_client import HelperClient, _connect_unix
from .mux import resolve_timeout

DEFAULT_OPEN_TIMEOUT_S = 30.0


@asynccontextmanager
async def open_guest(
    helper_socket: str, vm: str, *, timeout: float = DEFAULT_OPEN_TIMEOUT_S,
    owner: int | None = None,
) -> AsyncIterator[GuestClient]:
    """A :class:`GuestClient` for VM ``vm`` over its own helper connection.

    ``timeout`` bounds each step of opening (connect and hello, GuestOpen,
    the agent's Hello); ``owner`` (root only) opens another user's VM."""
    seconds = resolve_timeout(timeout, DEFAULT_OPEN_TIMEOUT_S)
    stream = await _connect_unix(helper_socket, seconds)
    async with stream:
        helper = HelperClient(stream, path=helper_socket)
        await helper._handshake("agentiso-guest", seconds)
        opened = await helper._greet(hp.GuestOpen(id=0, vm=vm, owner=owner), seconds)
        if not isinstance(opened, hp.GuestOpened):
            raise UnexpectedMessage("guest_opened in answer to guest_open", opened)
        # The helper client read exactly the GuestOpened frame: the guest
        # stream the relay sends behind it is still unread in the socket.
        async with GuestClient.connect(
            stream, hello_timeout=seconds, peer=f"VM {vm!r}'s guest agent", hop=Hop.RELAY
        ) as guest:
            yield guest


__all__ = ["DEFAULT_OPEN_TIMEOUT_S", "open_guest"]
