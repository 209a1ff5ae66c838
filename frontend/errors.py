"""Exceptions of the frontend.  :class:`FrontendError` is the root.

Typed answers from the helper or a guest arrive as
:class:`agentiso.protocol.errors.RemoteError` subclasses (``NotFound``,
``Conflict``, ...).  What the frontend itself detects derives from
:class:`FrontendError`:

* :class:`ConnectionLost` — the connection a request travels on is gone (or
  its session restarted), so no answer will come.  ``hop`` says which link
  broke: the helper socket, the helper's relay to a guest, or the guest agent.
  A request in flight may or may not have taken effect.
* :class:`HelperUnavailable` — a :class:`ConnectionLost` raised before a
  helper connection was usable (cannot connect, no hello): the request never
  reached the helper.  It is a subclass, not a sibling, so one
  ``except ConnectionLost`` covers "the helper is not there" in every form;
  catch :class:`HelperUnavailable` first where "never sent" matters.
* :class:`RequestTimeout` — no answer within the request's timeout.  Both
  clients raise it, and only it, for an expired deadline.
* :class:`InvalidArgument` — an argument refused by a client before anything
  was sent (out of the message's bounds, a negative timeout): the caller's.

``ConnectionLost`` is also a protocol ``Unavailable``, ``RequestTimeout`` a
protocol ``RemoteTimeout`` and ``InvalidArgument`` a protocol
``InvalidRequest`` (and a ``LocalProtocolError``: nothing went on the wire):
code that maps error codes (``exc.code``) treats a failure the frontend
detected like the same failure reported by a peer; catch the frontend class
to know it was detected here (so a handler that catches both ``FrontendError``
and ``RemoteError`` must decide which comes first).
"""

from __future__ import annotations

import enum

from agentiso.protocol.errors import (
    InvalidRequest,
    LocalProtocolError,
    RemoteTimeout,
    Unavailable,
)


class FrontendError(Exception):
    """Root of the frontend's own exceptions."""


class Hop(enum.StrEnum):
    """The link of the path frontend → helper → relay → guest agent that broke."""

    #: Our Unix socket connection to the helper.
    HELPER_SOCKET = "helper socket"
    #: A guest channel the helper relays for us (after ``GuestOpen``).
    RELAY = "helper relay"
    #: The guest agent itself (restarted, or broke the guest protocol).
    GUEST_AGENT = "guest agent"


class ConnectionLost(FrontendError, Unavailable):
    """The connection is gone: requests in flight on it failed, later ones
    fail at once.  The message says which hop broke and what to do; the
    underlying error, if any, is ``__cause__``."""

    def __init__(self, hop: Hop, message: str, *, cause: BaseException | None = None) -> None:
        self.hop = hop
        super().__init__(f"{hop}: {message}")
        if cause is not None:
            self.__cause__ = cause


#: What to do when the helper cannot be reached, unless the raiser knows better.
START_THE_HELPER = (
    "start the helper (systemctl start agentiso-helper.socket, or agentiso-helper serve"
    " --socket PATH), make sure you are root or in its group, then retry"
)


class HelperUnavailable(ConnectionLost):
    """The helper cannot be reached at all: nothing was sent to it.

    ``reason`` is the cause (one line, naming the hop) and ``advice`` what to
    do, kept apart so a tool error can show each once, on its own line;
    ``str()`` joins them (for logs and the command line)."""

    def __init__(self, message: str, *, advice: str = START_THE_HELPER,
                 cause: BaseException | None = None) -> None:
        self.reason = f"{Hop.HELPER_SOCKET}: {message}"
        self.advice = advice
        super().__init__(Hop.HELPER_SOCKET, f"{message}; {advice}", cause=cause)


class RequestTimeout(FrontendError, RemoteTimeout):
    """A request got no (complete) answer within its timeout.  ``what`` names
    the request and its peer; ``seconds`` is the timeout that expired."""

    def __init__(self, what: str, seconds: float, advice: str = "") -> None:
        self.what = what
        self.seconds = seconds
        text = f"{what} got no answer within {seconds:g} s"
        super().__init__(f"{text}; {advice}" if advice else text)


class InvalidArgument(FrontendError, InvalidRequest, LocalProtocolError):
    """A request or setting refused before it was sent: the caller's fault.
    The message names the request and the field (``volume_create: bad name:
    ...``)."""
