"""The fork tool: workspace_fork."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from .results import ForkItem, ForkResult
from .toolerrors import describe, tool_errors
from .tools_snapshots import SnapshotName
from .tools_workspace import Name, WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime


def register(app: MCPServer[Any], rt: Runtime) -> None:
    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False), description=(
        "Make `count` new workspaces from a snapshot of this one, each with its own disk, "
        "address, MAC, hostname and machine-id, named name_prefix-1, -2, ... Without "
        "`snapshot`, forks the current state: a running workspace is forked live (its "
        "memory too: running processes go on in every fork). The quotas are checked for "
        "the whole batch before anything is made. Each fork is reported separately; a "
        "failed one leaves nothing. If no fork is made, the snapshot taken for them is "
        "deleted again, except a live one (a running workspace's disk): it is kept and "
        "`note` says so."))
    @tool_errors
    async def workspace_fork(
        workspace: WorkspaceRef,
        snapshot: SnapshotName | None = None,
        count: Annotated[int, Field(ge=1, le=1000, description=(
            "How many forks (at most [quotas] forks_per_call, 20 by default)"))] = 1,
        name_prefix: Name | None = None,
    ) -> ForkResult:
        batch = await rt.ws.fork(workspace, snapshot=snapshot, count=count,
                                 name_prefix=name_prefix)
        items = []
        for o in batch.outcomes:
            net = o.vm.network if o.vm is not None else None
            items.append(ForkItem(
                name=o.name, ok=o.error is None, id=o.record.id if o.record else None,
                state=str(o.record.state) if o.record else None,  # type: ignore[arg-type]
                address=net.address if net else None,
                error=None if o.error is None else describe(o.error, "workspace_fork"),
            ))
        ok = sum(1 for i in items if i.ok)
        return ForkResult(source=batch.source.name, snapshot=batch.snapshot.name,
                          live=batch.snapshot.memory, forks=items, created=ok,
                          failed=len(items) - ok, note=batch.note)
