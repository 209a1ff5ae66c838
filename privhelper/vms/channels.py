"""The guest channel of every running VM, kept up by a task per VM.

A VM's :class:`~agentiso.privhelper.relay.GuestChannel` lives from its start
(or adoption) until its stop; requests and relayed clients look it up here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteStream, TaskGroup

from agentiso.protocol.errors import ErrorCode

from .. import vsock
from ..errors import HelperError, RequestFailed
from ..registry import Registry, VmRecord
from ..relay import GuestChannel
from ..vm.engine import VmEngine, VmState


@dataclass
class _Running:
    channel: GuestChannel
    scope: anyio.CancelScope


@dataclass
class GuestChannels:
    """Per-VM guest channels by registry key.

    No lock: every method is synchronous (no await between a lookup and the
    change it makes), so the event loop already serialises them.
    """

    registry: Registry
    engine: VmEngine
    tg: TaskGroup
    _running: dict[str, _Running] = field(default_factory=dict)

    def start(self, key: str) -> GuestChannel:
        """Bring up the channel of VM ``key`` (vsock if its record has a CID)."""
        rec = next((m for m in self.registry.vms() if m.key == key), None)
        cid = rec.cid if rec is not None else None
        secret = bytes.fromhex(rec.secret) if rec is not None and rec.secret else None
        engine = self.engine

        async def connect() -> ByteStream:
            if cid is not None:
                return await vsock.connect(cid)
            return await anyio.connect_unix(engine.channel_socket(key))

        channel = GuestChannel(name=key, connect=connect, secret=secret)
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await channel.run()

        self.tg.start_soon(run)
        self._running[key] = _Running(channel=channel, scope=scope)
        return channel

    def stop(self, key: str) -> None:
        running = self._running.pop(key, None)
        if running is not None:
            running.scope.cancel()

    def get(self, key: str) -> GuestChannel | None:
        """The channel of ``key`` whether or not it is up (None: none was started)."""
        running = self._running.get(key)
        return None if running is None else running.channel

    def of_running(self, vm: VmRecord) -> GuestChannel:
        """The channel of a VM that runs; ``unavailable`` otherwise."""
        running = self._running.get(vm.key)
        try:
            st = self.engine.status(vm.key)
        except HelperError:
            st = None
        if st is not None and st.io_error is not None:
            raise RequestFailed(
                ErrorCode.UNAVAILABLE, f"VM {vm.name!r} is paused by QEMU: {st.io_error}"
            )
        if running is None or (st is not None and st.state != VmState.RUNNING):
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"VM {vm.name!r} is not running")
        return running.channel


def engine_state(engine: VmEngine, key: str) -> VmState | None:
    """The engine's state of ``key``; None if the engine does not know it."""
    try:
        return engine.status(key).state
    except HelperError:
        return None
