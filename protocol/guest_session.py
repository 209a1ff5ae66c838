"""The guest channel's session handshake, both sides, sans-io.

A session starts with the host's marker and the agent's answer::

    host  -> HOST_SYNC_MAGIC + nonce          (raw; resent every SYNC_RETRY_S)
    agent -> GUEST_SYNC_MAGIC, Hello(sync_nonce=nonce, session=N)

* :class:`HostSync` is the host side (the frontend's client, the helper's
  relay towards the agent): which Hello starts or continues a session.
* :class:`AgentSync` is the agent side (the agent, and the relay towards its
  own clients, to whom it plays the agent): which marker restarts a session.

Rules, one place for every user:

* The host ignores every Hello but the one echoing its nonce while it waits
  (stale greetings queued for an earlier host).
* Once in a session, a Hello with the same session number is the agent
  greeting again (a virtio port saw the host come back, or a late answer to
  a resent marker): nothing is lost.  A Hello with another number, unprompted,
  means the agent restarted: whatever was in flight is lost.
* A Hello that starts a session must carry our protocol version
  (:class:`VersionMismatch` otherwise).
* An ``Error(id=0, permission_denied)`` is the agent refusing the connection
  (vsock authentication); other id-0 errors are reports about the connection.
* The agent answers a marker whose nonce it already answered with nothing: a
  host resends its marker until answered.

The bytes and the timers are the caller's: these classes only decide.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable

import msgspec

from . import guest as gp
from .errors import ErrorCode, RemoteError, VersionMismatch, remote_error
from .framing import encode_frame
from .guest_constants import GUEST_MAX_FRAME, GUEST_SYNC_MAGIC, SYNC_NONCE_LEN
from .guest_stream import host_marker


class SessionStart(enum.Enum):
    """What a Hello that starts a session means for requests in flight: both
    kinds end them (the agent will never answer them)."""

    #: The Hello echoes our marker: the session we asked for.
    ANSWERED = "answered"
    #: An unprompted Hello of a new session: the agent restarted on its own.
    RESTARTED = "restarted"


class HostSync:
    """Host side of the handshake.

    Usage::

        sync = HostSync()
        send(sync.start())                 # and again sync.marker every SYNC_RETRY_S
        ...                                #   while sync.awaiting
        for each decoded message:
            if isinstance(msg, gp.Hello):
                started = sync.on_hello(msg)   # None: ignore it
            elif isinstance(msg, gp.Error) and msg.id == 0:
                refusal = sync.on_connection_error(msg)   # not None: raise it
    """

    def __init__(
        self,
        version: int = gp.GUEST_PROTOCOL_VERSION,
        # os.urandom is what secrets.token_bytes is; importing secrets costs
        # the guest agent's cold boot tens of ms under TCG (random, hmac).
        token: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.version = version
        self._token = token
        self._nonce: bytes | None = None
        #: The greeting of the session we are in (None before the first).
        self.hello: gp.Hello | None = None

    @property
    def awaiting(self) -> bool:
        """A marker of ours is not answered yet."""
        return self._nonce is not None

    @property
    def marker(self) -> bytes:
        """The marker to (re)send while :attr:`awaiting`."""
        if self._nonce is None:
            raise RuntimeError("no handshake in progress: call start()")
        return host_marker(self._nonce)

    def start(self) -> bytes:
        """Begin (or restart) a session with a fresh nonce; returns the marker
        to send.  Until it is answered every other Hello is ignored."""
        self._nonce = self._token(SYNC_NONCE_LEN)
        self.hello = None
        return host_marker(self._nonce)

    def on_hello(self, hello: gp.Hello) -> SessionStart | None:
        """Judge a Hello: None when it changes nothing (ignore it), else the
        kind of session it starts (``self.hello`` is then the new one).

        Raises :class:`VersionMismatch` when a session would start with a
        version other than ours."""
        if self._nonce is not None:
            if hello.sync_nonce != self._nonce:
                return None  # a greeting from before our marker
            kind = SessionStart.ANSWERED
        elif self.hello is not None and hello.session == self.hello.session:
            return None  # the same session greeting again
        else:
            kind = SessionStart.RESTARTED
        if hello.version != self.version:
            raise VersionMismatch(self.version, hello.version)
        self._nonce = None
        self.hello = hello
        return kind

    @staticmethod
    def on_connection_error(error: gp.Error) -> RemoteError | None:
        """An ``Error`` with id 0: the exception to raise when it means the
        agent refused the connection (authentication), else None (a report
        about the connection, e.g. a framing error it recovered from)."""
        if error.id == 0 and error.code == ErrorCode.PERMISSION_DENIED:
            return remote_error(error.code, error.message)
        return None


class AgentSync:
    """Agent side of the handshake: which host markers start a new session."""

    def __init__(self) -> None:
        #: The nonce of the marker the current session answered.
        self.answered: bytes | None = None

    def on_marker(self, nonce: bytes) -> bool:
        """True when the marker starts a new session (cancel what is in flight,
        then answer with :func:`greeting` echoing ``nonce``); False for a
        repeat of the nonce already answered (ignore it)."""
        if nonce == self.answered:
            return False
        self.answered = nonce
        return True


def greeting(hello: gp.Hello, *, nonce: bytes | None = None, session: int | None = None
             ) -> bytes:
    """The bytes an agent (or the relay, playing one) greets with: the guest
    sync marker and the framed Hello; ``nonce``/``session`` replace the
    Hello's own."""
    changes: dict[str, object] = {}
    if nonce is not None:
        changes["sync_nonce"] = nonce
    if session is not None:
        changes["session"] = session
    if changes:
        hello = msgspec.structs.replace(hello, **changes)
    return behind_marker(hello)


def behind_marker(msg: gp.GuestResponse) -> bytes:
    """The guest sync marker then ``msg`` framed: how an agent starts what
    it sends on a connection (the host decodes nothing before a marker): its
    Hello, or the Error that refuses an unauthenticated connection."""
    return GUEST_SYNC_MAGIC + encode_frame(gp.response_codec.encode(msg), GUEST_MAX_FRAME)
