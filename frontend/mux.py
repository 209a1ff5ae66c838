"""What both clients (helper and guest) share: request ids, the table of
requests waiting for answers, failing them all, timeouts, and checking a
request against its protocol's bounds before it is sent.

One connection carries many requests at once.  A client asks :class:`Mux`
for a :class:`Pending` (a fresh id and a small bounded buffer), sends its
message *copied* with that id (the caller's message is never changed), and
waits on the Pending; its reader task hands every incoming message to
:meth:`Mux.deliver` by id.  When the connection ends the reader calls
:meth:`Mux.close` with a factory of the error every waiter (and every later
request) raises: a fresh exception per raise, never one instance shared by
several tasks.

Timeouts (:func:`resolve_timeout`): ``None`` means the client's default,
``0`` means "now" (only an answer already received counts: a new request
fails at once with :class:`RequestTimeout` without being sent), a negative
or non-finite value is refused with :class:`InvalidArgument`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agentiso.protocol.codec import Codec
from agentiso.protocol.errors import DecodeError, OversizeMessage
from agentiso.protocol.framing import encode_frame

from .errors import InvalidArgument, RequestTimeout

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

#: Makes the exception a waiter raises; called once per raise.
ErrorFactory = Callable[[], Exception]

#: What a byte stream raises when the other end is gone or the stream is
#: closed (OSError covers ConnectionError and a socket's ETIMEDOUT).  Each
#: client maps these to its ConnectionLost at its stream's edge.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


# --- timeouts -------------------------------------------------------------------------


def resolve_timeout(timeout: float | None, default: float, name: str = "timeout") -> float:
    """The number of seconds to wait: ``default`` for None, else ``timeout``
    checked to be a finite number >= 0 (InvalidArgument otherwise: a caller's
    bug, refused before anything is sent)."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidArgument(f"{name} must be a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class Deadline:
    """A point in time (anyio's clock) by which an answer must have come.

    ``what`` names the request and its peer; ``advice`` says what to do when
    it expires; both go into the :class:`RequestTimeout`."""

    at: float
    seconds: float
    what: str
    advice: str = ""

    @classmethod
    def after(cls, seconds: float, what: str, advice: str = "") -> Deadline:
        return cls(anyio.current_time() + seconds, seconds, what, advice)

    def remaining(self) -> float:
        return self.at - anyio.current_time()

    def error(self) -> RequestTimeout:
        return RequestTimeout(self.what, self.seconds, self.advice)

    @contextmanager
    def limit(self) -> Iterator[None]:
        """Run the block within the deadline; raise RequestTimeout when it
        expires (or has already expired: then the block does not run)."""
        left = self.remaining()
        if left <= 0:
            raise self.error()
        with anyio.move_on_after(left) as scope:
            yield
        if scope.cancelled_caught:
            raise self.error()


# --- pending requests -----------------------------------------------------------------


class Pending(Generic[T]):
    """The receive side of one request: its id and a bounded buffer of the
    messages that arrived for it (one for a plain request, a credit window
    for a stream)."""

    def __init__(self, rid: int, buffer: int) -> None:
        self.id = rid
        send, recv = anyio.create_memory_object_stream[T](buffer)
        self.send: MemoryObjectSendStream[T] = send
        self.recv: MemoryObjectReceiveStream[T] = recv
        #: Set once the request's last message (or its failure) was taken:
        #: nothing remains to cancel at the peer.
        self.finished = False
        self._failure: ErrorFactory | None = None

    def put(self, item: T) -> bool:
        """Buffer an incoming message; False when the buffer is full."""
        try:
            self.send.send_nowait(item)
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # failed or forgotten meanwhile: drop it
        return True

    def fail(self, make: ErrorFactory) -> None:
        """End the request with ``make()``.  Messages already buffered are
        still received first (an answer that came before the failure counts)."""
        if self._failure is None:
            self._failure = make
        self.send.close()

    async def receive(self, deadline: Deadline) -> T:
        """The next message, or the request's failure, or RequestTimeout.
        Once the deadline has passed, a message already buffered is still
        returned (timeout 0: only what is already here)."""
        left = deadline.remaining()
        try:
            if left <= 0:
                return self.recv.receive_nowait()
            with anyio.move_on_after(left):
                return await self.recv.receive()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            self.finished = True
            if self._failure is None:  # forgotten while a receiver still waited: our bug
                raise RuntimeError(f"request {self.id} was already finished") from None
            err = self._failure()
            raise err from err.__cause__  # keep the cause the factory gave it
        raise deadline.error()

    def close(self) -> None:
        self.send.close()
        self.recv.close()


class Mux(Generic[T]):
    """The table of one connection's requests waiting for answers."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)  # 0 is the connection's own id on both protocols
        self.pending: dict[int, Pending[T]] = {}
        self._closed: ErrorFactory | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def next_id(self) -> int:
        """A fresh id for a message that expects no Pending (e.g. a Cancel)."""
        return next(self._ids)

    def open(self, buffer: int = 1) -> Pending[T]:
        """Register a new request; raises the connection's error once closed."""
        if self._closed is not None:
            raise self._closed()
        pending: Pending[T] = Pending(self.next_id(), buffer)
        self.pending[pending.id] = pending
        return pending

    def forget(self, pending: Pending[T]) -> None:
        """The request is over (answered, failed or abandoned): late answers
        to its id are dropped from now on."""
        if self.pending.get(pending.id) is pending:
            del self.pending[pending.id]
        pending.close()

    def deliver(self, rid: int, item: T, overflow: ErrorFactory) -> None:
        """Route an incoming message to its request.  An id nobody waits for
        (a late answer to a request given up on) is dropped; a full buffer (a
        peer ignoring flow control) fails that request alone with ``overflow()``."""
        pending = self.pending.get(rid)
        if pending is not None and not pending.put(item):
            del self.pending[rid]
            pending.fail(overflow)

    def fail_one(self, rid: int, make: ErrorFactory) -> None:
        """Fail request ``rid`` alone (e.g. its answer could not be decoded)."""
        pending = self.pending.pop(rid, None)
        if pending is not None:
            pending.fail(make)

    def fail_all(self, make: ErrorFactory) -> None:
        """Fail every request in flight; the connection goes on."""
        pending, self.pending = self.pending, {}
        for p in pending.values():
            p.fail(make)

    def close(self, make: ErrorFactory) -> None:
        """The connection is gone: fail every request in flight and every
        later one.  The first reason given wins."""
        if self._closed is None:
            self._closed = make
        self.fail_all(self._closed)

    def closed_error(self) -> Exception | None:
        """A fresh instance of the error that closed the connection, if closed."""
        return None if self._closed is None else self._closed()


# --- checking requests before they are sent ---------------------------------------------

#: Where msgspec says a value failed: "... - at `$.a.b`", or for a mapping's
#: key "... - at `key` in `$.env`".
_AT_FIELD = re.compile(r"\s*-\s*at `(?P<at>[^`]*)`(?: in `(?P<within>[^`]*)`)?\s*\Z")


def tag_of(msg: msgspec.Struct | type[msgspec.Struct]) -> str:
    """The wire name of a message (its union tag), for error texts."""
    cls = msg if isinstance(msg, type) else type(msg)
    tag = cls.__struct_config__.tag
    return tag if isinstance(tag, str) else cls.__name__


def encode_checked(codec: Codec[Any], msg: msgspec.Struct, max_frame: int) -> bytes:
    """``msg`` as a frame, after checking it against every bound of the
    codec's union (msgspec checks bounds when decoding, not when a struct is
    built).  A bad value raises InvalidArgument naming the request and field."""
    try:
        body = codec.encode(msg)
        codec.decode(body)
        return encode_frame(body, max_frame)
    except DecodeError as exc:
        raise InvalidArgument(_bad_argument(msg, str(exc))) from None
    except OversizeMessage as exc:
        raise InvalidArgument(f"{tag_of(msg)}: the request is too large ({exc})") from None
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise InvalidArgument(f"{tag_of(msg)}: cannot encode an argument: {exc}") from None


def build_checked(codec: Codec[Any], cls: type[S], **fields: Any) -> S:
    """Construct request ``cls`` with id 0 (each client assigns its own id
    when sending) and check its bounds now, so a bad argument fails here with
    InvalidArgument, not at the peer."""
    try:
        msg = cls(id=0, **fields)
    except (TypeError, ValueError) as exc:  # a missing field, or a cross-field rule
        raise InvalidArgument(f"{tag_of(cls)}: {exc}") from None
    encode_checked(codec, msg, 2**32 - 1)
    return msg


def _bad_argument(msg: msgspec.Struct, detail: str) -> str:
    m = _AT_FIELD.search(detail)
    if m is None:
        return f"{tag_of(msg)}: {detail}"
    field = _path(m["at"])
    if m["within"] is not None:
        field = f"{_path(m['within'])} ({field})"
    return f"{tag_of(msg)}: bad {field}: {detail[: m.start()]}"


def _path(where: str) -> str:
    """msgspec's ``$.policy.peers[3]`` as ``policy.peers[3]``."""
    return where.removeprefix("$").removeprefix(".") or "message"


#: How long one frame may take to go out once its first byte is written.
FRAME_SEND_TIMEOUT_S = 30.0


async def send_whole_frame(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    """Write one frame completely, or fail the connection.

    A frame cut in the middle (a caller cancelled while a large frame was
    still being written in pieces) would leave the peer mid-frame and break
    every other request on a shared connection.  So the write is shielded
    from the caller's cancellation, and bounded by its own timeout instead:
    a peer that stops reading for that long raises ``TimeoutError``, and the
    caller closes the connection.  A cancellation still takes effect at the
    caller's next checkpoint, after the frame is out.
    """
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(FRAME_SEND_TIMEOUT_S) as scope:
            await stream.send(data)
    if scope.cancelled_caught:
        raise TimeoutError(f"a frame could not be written within {FRAME_SEND_TIMEOUT_S:g} s")
