"""The snapshot tools: snapshot_create, snapshot_list, snapshot_restore, snapshot_delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from .results import (
    SnapshotCreated,
    SnapshotDeleted,
    SnapshotNode,
    SnapshotRestored,
    SnapshotTree,
    utc,
)
from .toolerrors import tool_errors
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

SnapshotName = Annotated[str, Field(min_length=1, max_length=63,
                                    pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                    description="The snapshot's name, unique in the workspace")]


def register(app: MCPServer[Any], rt: Runtime) -> None:
    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False), description=(
        "Snapshot the workspace's disk (consistent: the guest syncs and freezes its file "
        "systems for the moment it takes), running or stopped. With include_memory, the "
        "running processes are saved too and a restore resumes them."))
    @tool_errors
    async def snapshot_create(
        workspace: WorkspaceRef,
        name: SnapshotName,
        description: Annotated[str, Field(max_length=1000)] = "",
        include_memory: bool = False,
    ) -> SnapshotCreated:
        snap = await rt.ws.snapshot_create(workspace, name, description, include_memory)
        return SnapshotCreated(workspace=rt.ws.get(workspace).name, name=snap.name,
                               parent=snap.parent, memory=snap.memory,
                               created_at=utc(snap.created_at))

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
              description=("The workspace's snapshots as a tree: parents, children, times, "
                           "sizes, which have memory, and which the current state "
                           "descends from."))
    @tool_errors
    async def snapshot_list(workspace: WorkspaceRef) -> SnapshotTree:
        rec, nodes, sizes = await rt.ws.snapshot_tree(workspace)
        return SnapshotTree(workspace=rec.name, head=rec.head, snapshots=[
            SnapshotNode(
                name=s.name, parent=s.parent,
                children=[c.name for c in nodes if c.parent == s.name],
                created_at=utc(s.created_at), description=s.description, memory=s.memory,
                size_bytes=sizes.get((s.volume, s.helper_name)), is_head=s.name == rec.head,
            ) for s in nodes])

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Bring the workspace back to any snapshot (not only the newest); the other "
        "snapshots are all kept. Unsaved changes since the last snapshot are discarded "
        "(the result says what). A running workspace is running again afterwards. A "
        "snapshot's memory is resumed only when it is the newest snapshot of the "
        "workspace's current disk; any other memory snapshot restores its disk and the "
        "workspace boots from it (memory_restored is false and `note` says so)."))
    @tool_errors
    async def snapshot_restore(workspace: WorkspaceRef, name: SnapshotName) -> SnapshotRestored:
        r = await rt.ws.snapshot_restore(workspace, name)
        return SnapshotRestored(workspace=r.record.name, restored=r.snapshot.name,
                                discarded=r.discarded, memory_restored=r.memory_restored,
                                state=str(r.record.state),  # type: ignore[arg-type]
                                note=r.note)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Delete a snapshot. Refused, naming them, while forks or later states depend on it."))
    @tool_errors
    async def snapshot_delete(workspace: WorkspaceRef, name: SnapshotName) -> SnapshotDeleted:
        await rt.ws.snapshot_delete(workspace, name)
        return SnapshotDeleted(workspace=rt.ws.get(workspace).name, name=name)
