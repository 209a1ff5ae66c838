"""The helper's VM requests, one service per concern:

* :mod:`.lifecycle`  VmStart, VmStop, VmGet, VmList, VmConsole, GuestOpen, adoption;
* :mod:`.network`    VmNetworkSet, ForwardAdd, ForwardRemove (and attaching a VM);
* :mod:`.snapshots`  SnapshotCreate (live when a VM runs on the volume);
* :mod:`.templates`  boot templates that a fresh volume's VmStart resumes;
* :mod:`.pool`       the warm pool: VMs resumed ahead of time that a VmStart takes over;
* :mod:`.admin`      AdminList, Gc;
* :mod:`.channels`   the guest channel of each running VM;
* :mod:`.views`      VmInfo as a client sees it; :mod:`.policy` its policy names;
* :mod:`.timer`      the task that ends VMs whose time limit passed;
* :mod:`.timelimited` time limits as clients see them (a layer over the life cycle).

Each service (and :class:`~agentiso.privhelper.service.WorkspaceService`)
declares the request types it handles in ``HANDLES``; :func:`handler_table`
refuses a type that two services claim.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import structlog
from anyio.abc import TaskGroup

from ..net.manager import NetworkManager
from ..server import Handler
from ..service import WorkspaceService
from ..vm.engine import VmEngine
from .admin import Admin
from .channels import GuestChannels
from .lifecycle import VmLifecycle
from .network import VmNetwork
from .pool import WarmPool
from .snapshots import LiveSnapshots
from .templates import Templates, migrate_owner
from .timelimited import TimeLimitedRequests
from .timer import TimeLimitTimer
from .views import VmViews

log = structlog.get_logger("agentiso.helper.vms")


class Service(Protocol):
    #: request type -> name of the method that handles it.
    HANDLES: ClassVar[dict[type[Any], str]]


#: Every service class of the helper, for the one-owner-per-request check.
SERVICE_TYPES: tuple[type[Any], ...] = (
    WorkspaceService, VmLifecycle, VmNetwork, LiveSnapshots, Admin,
)


def claims(services: Iterable[Service | type[Any]]) -> dict[type[Any], str]:
    """request type -> the one service (class name) that handles it.

    A request type claimed by two services is a wiring bug: ``ValueError``."""
    owner: dict[type[Any], str] = {}
    for service in services:
        name = service.__name__ if isinstance(service, type) else type(service).__name__
        for req in service.HANDLES:
            if req in owner:
                raise ValueError(f"{req.__name__} is handled by both {owner[req]} and {name}")
            owner[req] = name
    return owner


def handler_table(services: Iterable[Service]) -> dict[type[Any], Handler]:
    """Every service's bound handlers in one table (see :func:`claims`)."""
    services = list(services)
    claims(services)
    return {req: getattr(s, method) for s in services for req, method in s.HANDLES.items()}


@dataclass
class VmServices:
    """The VM services of one helper, sharing its engine, channels and network."""

    lifecycle: VmLifecycle
    network: VmNetwork
    snapshots: LiveSnapshots
    admin: Admin
    #: Run :meth:`TimeLimitTimer.run` in a task once the VMs are adopted.
    timer: TimeLimitTimer
    time_limits: TimeLimitedRequests
    #: Boot templates; VmStart of a fresh volume resumes one when it fits.
    templates: Templates
    #: The warm pool: run :meth:`WarmPool.run` in a task once the VMs are adopted.
    pool: WarmPool

    @classmethod
    def build(
        cls, ws: WorkspaceService, engine: VmEngine, tg: TaskGroup,
        net: NetworkManager | None,
    ) -> VmServices:
        channels = GuestChannels(ws.registry, engine, tg)
        views = VmViews(ws.registry, engine, net)
        network = VmNetwork(ws.registry, views, net)
        lifecycle = VmLifecycle(ws, engine, channels, network, views)
        timer = TimeLimitTimer(ws, lifecycle, channels)
        views.expires_at = timer.expires_at
        snapshots = LiveSnapshots(ws, engine, channels, network)
        templates = Templates(ws, ws.config.templates, tg, lifecycle, snapshots)
        if moved := migrate_owner(ws.registry):
            ws.registry.save()
            log.info("templates_moved_from_root", templates=moved)
        lifecycle.templates = templates
        pool = WarmPool(ws, ws.config.pool, templates, lifecycle, tg)
        lifecycle.pool = pool
        return cls(
            lifecycle=lifecycle,
            network=network,
            snapshots=snapshots,
            admin=Admin(ws, engine, views, net),
            timer=timer,
            time_limits=TimeLimitedRequests(timer),
            templates=templates,
            pool=pool,
        )

    def handlers(self, ws: WorkspaceService) -> dict[type[Any], Handler]:
        """The server's handler table: every service's, time limits over the life cycle."""
        return self.time_limits.wrap(handler_table([ws, *self.services()]))

    def services(self) -> list[Service]:
        return [self.lifecycle, self.network, self.snapshots, self.admin]
