"""Async client of the root helper, used by the frontend.

One connection carries many requests at once: each request gets a fresh id,
a reader task routes every response to the request that carries the same id.

Usage::

    async with connect_helper("/run/agentiso/helper.sock") as helper:
        await helper.ping()
        who = await helper.whoami()

Errors:

* :class:`HelperUnavailable` — could not connect, or the connection broke
  (nothing the request itself did wrong);
* a :class:`agentiso.protocol.errors.RemoteError` subclass — the helper
  refused or failed this request, with its typed code;
* :class:`agentiso.protocol.errors.RemoteTimeout` — no answer in time (raised
  locally; the request may still complete on the helper).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import ByteStream

from agentiso.protocol import helper as hp
from agentiso.protocol.errors import (
    ProtocolError,
    RemoteError,
    RemoteTimeout,
    remote_error,
)
from agentiso.protocol.framing import encode_frame
from agentiso.protocol.stream import FrameReader

from .errors import FrontendError

DEFAULT_TIMEOUT_S = 30.0
R = TypeVar("R", bound=hp.HelperResponse)


class HelperUnavailable(FrontendError):
    """The helper cannot be reached, or the connection to it was lost."""


@dataclass
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    response: hp.HelperResponse | None = None
    error: Exception | None = None

    def resolve(self, response: hp.HelperResponse | None, error: Exception | None) -> None:
        if not self.done.is_set():
            self.response, self.error = response, error
            self.done.set()


class HelperClient:
    """A connected, greeted helper session.  Create it with :func:`connect_helper`."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._send_lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._closed: Exception | None = None
        self.hello: hp.HelloOk | None = None

        async def receive() -> bytes:
            try:
                return await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return b""

        self._reader = FrameReader(receive, hp.HELPER_MAX_FRAME)

    # --- public API ------------------------------------------------------------------

    async def ping(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        await self.call(hp.Ping(id=0), hp.Pong, timeout=timeout)

    async def whoami(self, timeout: float = DEFAULT_TIMEOUT_S) -> hp.Identity:
        return await self.call(hp.WhoAmI(id=0), hp.Identity, timeout=timeout)

    async def call(
        self, msg: hp.HelperRequest, expect: type[R], *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> R:
        """Send ``msg`` (its id is assigned here) and return the response,
        checked to be of type ``expect``."""
        resp = await self.request(msg, timeout=timeout)
        if not isinstance(resp, expect):
            raise ProtocolError(
                f"helper answered {type(resp).__name__} to {type(msg).__name__}"
            )
        return resp

    async def request(
        self, msg: hp.HelperRequest, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> hp.HelperResponse:
        if self._closed is not None:
            raise HelperUnavailable(f"connection to the helper is closed: {self._closed}")
        rid = next(self._ids)
        msg = msgspec.structs.replace(msg, id=rid)
        pending = self._pending[rid] = _Pending()
        try:
            frame = encode_frame(hp.request_codec.encode(msg), hp.HELPER_MAX_FRAME)
            with anyio.fail_after(timeout):
                async with self._send_lock:
                    await self._stream.send(frame)
                await pending.done.wait()
        except TimeoutError:
            raise RemoteTimeout(
                f"{type(msg).__name__} got no answer from the helper within {timeout} s"
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise HelperUnavailable(f"lost the connection to the helper: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        return pending.response

    # --- internals --------------------------------------------------------------------

    async def _handshake(self, client_name: str, timeout: float) -> None:
        hello = hp.Hello(id=0, version=hp.HELPER_PROTOCOL_VERSION, client=client_name)
        frame = encode_frame(hp.request_codec.encode(hello), hp.HELPER_MAX_FRAME)
        try:
            with anyio.fail_after(timeout):
                await self._stream.send(frame)
                body = await self._reader.read()
        except TimeoutError:
            raise HelperUnavailable("the helper did not answer hello in time") from None
        except (anyio.BrokenResourceError, OSError) as exc:
            raise HelperUnavailable(f"lost the connection to the helper: {exc}") from None
        if body is None:
            raise HelperUnavailable("the helper closed the connection during hello")
        resp = hp.response_codec.decode(body)
        if isinstance(resp, hp.Error):
            raise remote_error(resp.code, resp.message)
        if not isinstance(resp, hp.HelloOk):
            raise ProtocolError(f"expected hello_ok, got {type(resp).__name__}")
        self.hello = resp

    async def _read_loop(self) -> None:
        reason: Exception = HelperUnavailable("the helper closed the connection")
        try:
            while (body := await self._reader.read()) is not None:
                resp = hp.response_codec.decode(body)
                if isinstance(resp, hp.Error) and resp.id == 0:
                    reason = remote_error(resp.code, resp.message)
                    break
                pending = self._pending.get(resp.id)
                if pending is None:
                    continue  # answer to a request that timed out locally
                if isinstance(resp, hp.Error):
                    pending.resolve(None, remote_error(resp.code, resp.message))
                else:
                    pending.resolve(resp, None)
        except ProtocolError as exc:
            reason = HelperUnavailable(f"the helper sent an invalid frame: {exc}")
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: Exception) -> None:
        self._closed = reason
        for pending in list(self._pending.values()):
            err = reason
            if isinstance(reason, RemoteError):
                err = remote_error(reason.code, reason.message)  # a fresh instance each
            pending.resolve(None, err)


@asynccontextmanager
async def connect_helper(
    path: str, *, timeout: float = 10.0, client_name: str = "agentiso-frontend"
) -> AsyncIterator[HelperClient]:
    """Connect, say hello, and keep a reader task running for the block's duration."""
    try:
        stream = await anyio.connect_unix(path)
    except OSError as exc:
        raise HelperUnavailable(
            f"cannot connect to the agentiso helper at {path}: {exc.strerror or exc}"
            " (is agentiso-helper.socket running, and are you in its group?)"
        ) from None
    async with stream:
        client = HelperClient(stream)
        await client._handshake(client_name, timeout)
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            # The reader never raises (it fails the pending requests instead),
            # so what the caller's block raises is kept out of the task group
            # and reaches the caller as itself, not inside an ExceptionGroup.
            tg.start_soon(client._read_loop)
            try:
                yield client
            except BaseException as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
