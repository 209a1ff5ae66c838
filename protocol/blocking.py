"""A minimal blocking helper client: one request at a time, stdlib sockets only.

For admin commands (``agentiso-helper status``) and scripts.  The frontend uses
the concurrent async client in :mod:`agentiso.frontend.helper_client`.
"""

from __future__ import annotations

import itertools
import socket
from types import TracebackType

import msgspec

from . import helper as hp
from .errors import RemoteProtocolError, UnexpectedMessage, remote_error
from .framing import FrameDecoder, encode_frame


class BlockingHelperClient:
    def __init__(self, path: str, timeout: float = 10.0, client: str = "blocking") -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._decoder = FrameDecoder(hp.HELPER_MAX_FRAME)
        self._pending: list[bytes] = []
        self._ids = itertools.count(1)
        try:
            self._sock.connect(path)
            ok = self.request(hp.Hello(id=0, version=hp.HELPER_PROTOCOL_VERSION, client=client))
        except BaseException:
            self._sock.close()
            raise
        if not isinstance(ok, hp.HelloOk):
            self._sock.close()
            raise UnexpectedMessage("hello_ok", ok)
        self.hello = ok

    def request(self, msg: hp.HelperRequest) -> hp.HelperResponse:
        """Send ``msg`` (its id is replaced) and wait for its response.

        A typed error from the helper is raised as a RemoteError subclass; a
        helper that breaks the protocol (or closes the connection) as a
        RemoteProtocolError; socket failures as OSError (TimeoutError when
        the helper is silent past the timeout).
        """
        rid = next(self._ids)
        msg = msgspec.structs.replace(msg, id=rid)
        self._sock.sendall(encode_frame(hp.request_codec.encode(msg), hp.HELPER_MAX_FRAME))
        while True:
            resp = hp.response_codec.decode(self._next_frame())
            if isinstance(resp, hp.Error):
                if resp.id in (rid, 0):
                    raise remote_error(resp.code, resp.message)
                continue
            if resp.id == rid:
                return resp

    def _next_frame(self) -> bytes:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                self._decoder.close()
                raise RemoteProtocolError("helper closed the connection")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BlockingHelperClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
