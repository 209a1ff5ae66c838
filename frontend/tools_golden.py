"""The fork-loop tools: workspace_prepare (a golden workspace to fork) and
workspace_merge (the forks' commits back into one repository).  The logic is
in ``golden`` and ``merge``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from . import golden, merge
from .results_git import MergeResult, Prepared
from .toolerrors import tool_errors
from .tools_exec import Command
from .tools_git import Branch, GitUrlArg, RepoPath
from .tools_network import AllowIn, _allow
from .tools_workspace import Image, Name, WorkspaceRef, _progress

if TYPE_CHECKING:
    from .server import Runtime


def register(app: MCPServer[Any], rt: Runtime) -> None:
    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True, open_world_hint=True),
              description=(
        "Prepare a golden workspace to fork: create workspace `name` from `image`, let it "
        "reach the network as `allow_internet`/`allow` say (as network_policy), clone "
        "`git_url` into `path`, run `setup_commands` there in order (shell commands), "
        "and snapshot it as 'golden' (with memory): then workspace_fork(name, "
        "snapshot='golden', count=N). Calling it again with the same arguments returns the "
        "existing one at once (reused=true); other arguments are refused unless "
        "rebuild=true (which destroys and redoes it). If a step fails, nothing is kept and "
        "the result (ok=false) carries that step's output in failed_step."))
    @tool_errors
    async def workspace_prepare(
        ctx: Context,
        name: Name,
        image: Image | None = None,
        git_url: GitUrlArg | None = None,
        path: RepoPath = "/root/repo",
        branch: Branch | None = None,
        setup_commands: Annotated[list[Command], Field(max_length=100, description=(
            "Shell commands run in `path`, in order; the first that fails stops it"))] = [],  # noqa: B006
        timeout_secs: Annotated[int, Field(ge=10, le=86400, description=(
            "For the clone and all setup commands together (default 1800)"))] = 1800,
        allow_internet: bool | None = None,
        allow: Annotated[list[AllowIn], Field(max_length=64, description=(
            "Networks and ports it may reach (as network_policy's allow)"))] | None = None,
        rebuild: bool = False,
    ) -> Prepared:
        d = rt.config.defaults
        wants_net = d.allow_internet if allow_internet is None else allow_internet
        return await golden.prepare(
            rt, name=name, image=image or d.image, git_url=git_url, path=path, branch=branch,
            setup_commands=list(setup_commands), timeout_secs=timeout_secs,
            allow_internet=wants_net, allow=None if allow is None else _allow(allow),
            rebuild=rebuild, progress=_progress(ctx, 4 + len(setup_commands)))

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False),
              description=(
        "Bring the commits of `sources` (e.g. forks of a golden workspace) into the "
        "repository at `path` of `target`, moved as git bundles through agentiso (no "
        "network between workspaces needed). strategy: 'sequential' merges each source "
        "into the current branch in turn (fast-forward when possible); 'cherry-pick' "
        "replays each source's new commits onto it; 'branch-per-source' makes a branch "
        "merge/<source> per source and leaves the current branch alone. The target must "
        "have no uncommitted changes. Per source: the commits applied, or the conflicting "
        "files (that source is not applied and the target is left clean)."))
    @tool_errors
    async def workspace_merge(
        sources: Annotated[list[WorkspaceRef], Field(min_length=1, max_length=100)],
        target: WorkspaceRef,
        path: RepoPath,
        strategy: Literal["sequential", "branch-per-source", "cherry-pick"] = "sequential",
    ) -> MergeResult:
        return await merge.merge(rt, sources=sources, target=target, path=path,
                                 strategy=strategy)

