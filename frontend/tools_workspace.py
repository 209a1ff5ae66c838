"""The workspace lifecycle tools: create, start, stop, destroy, list, info, ip, logs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from .results import (
    Adopted,
    Destroyed,
    Forward,
    Orphan,
    WorkspaceInfo,
    WorkspaceIp,
    WorkspaceList,
    WorkspaceLogs,
    WorkspaceSummary,
    utc,
)
from .toolerrors import tool_errors
from .workspace_errors import WorkspaceError
from .workspaces import Detail

if TYPE_CHECKING:
    from .server import Runtime

log = structlog.get_logger("agentiso.frontend.tools")

WorkspaceRef = Annotated[
    str, Field(min_length=1, max_length=80, description="The workspace's name or id")
]
Name = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$",
          description="Lowercase letters, digits and dashes; unique among your workspaces"),
]
Image = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$",
          description="Guest image: 'minimal' (Debian, python3) or 'dev' (git, curl, "
          "compilers) where built"),
]


class NoAddress(WorkspaceError):
    pass


def summary(d: Detail, own_session: str) -> dict[str, Any]:
    r = d.record
    net = d.vm.network if d.vm is not None else None
    return dict(
        id=r.id, name=r.name, state=str(r.state), state_reason=r.state_reason, image=r.image,
        vcpus=r.vcpus, memory_mb=r.memory_mb, disk_gb=r.disk_gb,
        allow_internet=r.allow_internet,
        address=net.address if net is not None and str(r.state) == "running" else None,
        created_at=utc(r.created_at), own_session=r.session == own_session,
    )


def _external(d: Detail) -> set[tuple[int, str]]:
    """The forwards opened to other hosts (the catalog keeps the opt-in)."""
    return {(f["host_port"], f["protocol"]) for f in d.record.network.get("forwards", [])
            if f.get("external")}


def info(d: Detail, own_session: str) -> WorkspaceInfo:
    running = str(d.record.state) == "running" and d.vm is not None
    net = d.vm.network if d.vm is not None else None
    return WorkspaceInfo(
        **summary(d, own_session),
        mac=net.mac if net else None,
        gateway=net.gateway if net else None,
        disk_size_bytes=d.volume.size_bytes if d.volume else None,
        disk_used_bytes=d.volume.used_bytes if d.volume else None,
        uptime_secs=round(max(time.time() - d.vm.created, 0.0), 3)
        if running and d.vm is not None else None,
        forwards=[Forward(host_port=f.host_port, guest_port=f.guest_port, protocol=f.protocol,
                          external=(f.host_port, f.protocol) in _external(d))
                  for f in (net.forwards if net else [])],
        snapshot_count=d.snapshot_count,
        accel=d.vm.accel or None if d.vm is not None else None,
        env_keys=sorted(d.record.env),
        forked_from=d.parent_name,
        forked_at_snapshot=d.record.parent_snapshot,
        idle_timeout_secs=d.record.time_limits.get("idle_s"),
        lifetime_secs=d.record.time_limits.get("lifetime_s"),
        expires_at=utc(d.vm.expires_at) if running and d.vm and d.vm.expires_at else None,
    )


def _progress(ctx: Context, total: int) -> Callable[[str], Awaitable[None]]:
    """Progress notifications that only ever increase (as the MCP spec asks)."""
    done = 0

    async def report(text: str) -> None:
        nonlocal done
        done = min(done + 1, total - 1)
        await ctx.report_progress(done, total, text)

    return report


async def _info_or_row(rt: Runtime, done: Detail) -> WorkspaceInfo:
    """The workspace after an operation that succeeded: in detail, or (if the
    helper cannot be asked again right now) from what the operation returned,
    so a success is never reported as a failure."""
    try:
        return info(await rt.ws.detail(done.record.id), rt.ws.session.id)
    except Exception as exc:
        log.info("detail_after_success_failed", error=str(exc))
        return info(done, rt.ws.session.id)


def register(app: MCPServer[Any], rt: Runtime) -> None:
    destructive = ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                  idempotent_hint=False)
    changes = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                              idempotent_hint=False)
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False,
                                idempotent_hint=True)

    @app.tool(annotations=changes, description=(
        "Create a workspace: an isolated Linux VM with its own disk (copy-on-write from the "
        "image) and network address, and return it once it is running and its agent "
        "answers. Internet access is off unless allow_internet. Omitted sizes come from "
        "your agentiso config (default 1 vCPU, 256 MB)."))
    @tool_errors
    async def workspace_create(
        ctx: Context,
        name: Name | None = None,
        image: Image | None = None,
        vcpus: Annotated[int, Field(ge=1, le=64, description="Virtual CPUs")] | None = None,
        memory_mb: Annotated[int, Field(ge=64, le=1024 * 1024, description="RAM in MB")]
        | None = None,
        disk_gb: Annotated[int, Field(ge=1, le=16 * 1024,
                                      description="Disk size in GB; omit for the image's")]
        | None = None,
        allow_internet: Annotated[bool, Field(description="Allow outbound internet access")]
        | None = None,
        idle_timeout_secs: Annotated[int, Field(ge=10, le=30 * 86400, description=(
            "Stop it after this long without any tool using it (held by the host: fires "
            "even with no agent connected)"))] | None = None,
        lifetime_secs: Annotated[int, Field(ge=10, le=30 * 86400, description=(
            "Stop it this long after it starts, whatever it is doing"))] | None = None,
        on_timeout: Annotated[Literal["stop", "destroy"], Field(description=(
            "What a time limit does: stop (the disk is kept) or destroy (VM, disk and "
            "snapshots are deleted; the workspace stays listed as stopped, its reason "
            "saying it was destroyed, until workspace_destroy removes the entry; "
            "workspace_start refuses it)"))] = "stop",
    ) -> WorkspaceInfo:
        d = rt.config.defaults
        progress = _progress(ctx, 4)

        made = await rt.ws.create(
            name=name, image=image or d.image, vcpus=vcpus or d.vcpus,
            memory_mb=memory_mb or d.memory_mb, disk_gb=disk_gb or d.disk_gb,
            allow_internet=d.allow_internet if allow_internet is None else allow_internet,
            progress=progress,
            time_limits={"idle_s": idle_timeout_secs, "lifetime_s": lifetime_secs,
                         "action": on_timeout} if idle_timeout_secs or lifetime_secs else None,
        )
        return await _info_or_row(rt, made)

    @app.tool(annotations=destructive, description=(
        "Destroy a workspace for good: its VM is killed and its disk deleted. "
        "Cannot be undone; use workspace_stop to keep the disk."))
    @tool_errors
    async def workspace_destroy(workspace: WorkspaceRef) -> Destroyed:
        rec = await rt.ws.destroy(workspace)
        return Destroyed(id=rec.id, name=rec.name)

    @app.tool(annotations=changes, description=(
        "Boot a stopped (or crashed) workspace again, with its disk as it was left. "
        "Refused for one a time limit destroyed (on_timeout=\"destroy\"): it has no disk."))
    @tool_errors
    async def workspace_start(ctx: Context, workspace: WorkspaceRef) -> WorkspaceInfo:
        d = await rt.ws.start(workspace, _progress(ctx, 3))
        return await _info_or_row(rt, d)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Stop a running workspace: processes end, the disk is kept. force kills the VM at "
        "once instead of shutting it down cleanly."))
    @tool_errors
    async def workspace_stop(
        workspace: WorkspaceRef,
        force: Annotated[bool, Field(description="Kill instead of a clean shutdown")] = False,
    ) -> WorkspaceSummary:
        rec = await rt.ws.stop(workspace, force=force)
        return WorkspaceSummary(**summary(Detail(rec, None, None), rt.ws.session.id))

    @app.tool(annotations=read_only, description=(
        "List your workspaces with their state and address. `orphans` lists helper "
        "resources no workspace claims (e.g. left by a crash)."))
    @tool_errors
    async def workspace_list() -> WorkspaceList:
        details, orphans = await rt.ws.list_all()
        return WorkspaceList(
            workspaces=[WorkspaceSummary(**summary(d, rt.ws.session.id)) for d in details],
            orphans=[Orphan(kind="vm" if o.kind == "vm" else "volume", name=o.name,
                            state=o.state) for o in orphans],
        )

    @app.tool(annotations=changes, description=(
        "Take over a workspace made by another agentiso session of yours (each MCP "
        "connection is one session; a workspace is used only by its own session)."))
    @tool_errors
    async def workspace_adopt(workspace: WorkspaceRef) -> WorkspaceSummary:
        rec = await rt.ws.adopt(workspace)
        return WorkspaceSummary(**summary(await rt.ws.detail(rec.id), rt.ws.session.id))

    @app.tool(annotations=changes, description=(
        "Take over every workspace whose agentiso session has ended (e.g. after the MCP "
        "client restarted or crashed). Workspaces of sessions still running are left alone."))
    @tool_errors
    async def workspace_adopt_all() -> Adopted:
        taken = await rt.ws.adopt_all()
        return Adopted(workspaces=[WorkspaceSummary(**summary(await rt.ws.detail(r.id),
                                                              rt.ws.session.id))
                                   for r in taken])

    @app.tool(annotations=read_only, description=(
        "Everything about one workspace: state (and why), address, resources, disk size "
        "and use, uptime, port forwards, snapshot count."))
    @tool_errors
    async def workspace_info(workspace: WorkspaceRef) -> WorkspaceInfo:
        return info(await rt.ws.detail(workspace), rt.ws.session.id)

    @app.tool(annotations=read_only, description=(
        "The workspace's IP address on the workspace network (running workspaces only)."))
    @tool_errors
    async def workspace_ip(workspace: WorkspaceRef) -> WorkspaceIp:
        d = await rt.ws.detail(workspace)
        net = d.vm.network if d.vm is not None else None
        if net is None or str(d.record.state) != "running":
            raise NoAddress(f"workspace {d.record.name!r} has no address (it is "
                            f"{d.record.state})", "start it with workspace_start")
        return WorkspaceIp(workspace=d.record.name, address=net.address, prefix=net.prefix,
                           gateway=net.gateway, mac=net.mac)

    @app.tool(annotations=read_only, description=(
        "The last lines of the workspace VM's console (kernel and boot messages) and the "
        "helper's account of any failure (e.g. why it crashed)."))
    @tool_errors
    async def workspace_logs(
        workspace: WorkspaceRef,
        lines: Annotated[int, Field(ge=1, le=5000, description="How many lines")] = 100,
    ) -> WorkspaceLogs:
        rec, text, reason = await rt.ws.console(workspace, max_bytes=min(lines * 512, 1 << 20))
        tail = text.splitlines()[-lines:]
        failure = "; ".join(x for x in (rec.state_reason if str(rec.state) in
                                        ("crashed", "stopped") else "", reason) if x)
        return WorkspaceLogs(workspace=rec.name, console="\n".join(tail), lines=len(tail),
                             failure=failure)
