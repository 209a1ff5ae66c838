"""The git tools: git_clone, git_status, git_diff, git_commit, git_push.

Git runs in the guest through the agent's exec with an argv (never a shell
string); the argv builders, parsers and redaction are in ``gitcmd`` (pure),
the runner in ``gitops``.  Every tool takes ``workspace`` and ``path``, the
repository's top directory in the guest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from . import gitcmd
from .catalog import WorkspaceRecord
from .execution import decode_output
from .gitops import GitFailed, git_text, run_git
from .guest_client import GuestClient
from .results_git import DiffFile, GitCloned, GitCommitted, GitDiff, GitPushed, GitStatus, Rename
from .toolerrors import BadArgument, tool_errors
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

RepoPath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^/", description=(
    "The repository's top directory in the workspace (absolute), e.g. /root/repo"))]
GitUrlArg = Annotated[str, Field(min_length=1, max_length=2048, description=(
    "https://, ssh:// (or user@host:path) or git:// URL; credentials in it are never "
    "echoed back or logged"))]
Branch = Annotated[str, Field(min_length=1, max_length=200, description="A branch name")]
NetTimeout = Annotated[int, Field(ge=5, le=86400, description=(
    "Give up (and kill git) after this many seconds (default: [limits] "
    "git_network_timeout_secs, 600)"))]


def check_egress(rec: WorkspaceRecord, url: gitcmd.GitUrl) -> None:
    """Refuse at once a URL whose host and port the workspace's policy does
    not allow (the network would drop it silently until git times out)."""
    net = rec.network
    why = gitcmd.egress_refusal(
        url, allow_internet=rec.allow_internet, allow=list(net.get("allow", [])),
        has_peers=bool(net.get("peers") or net.get("groups")))
    if why is not None:
        raise BadArgument(f"cannot reach {url.shown}: {why}\nAllow it first with "
                          "network_policy (allow_internet=true and an allow rule for that "
                          "address and port).")


async def head_of(g: GuestClient, ws: str, repo: str) -> tuple[str | None, str | None]:
    """(commit, branch) of the repository's HEAD; None where there is none."""
    base = gitcmd.base_argv(repo)
    out = await run_git(g, [*base, "rev-parse", "--verify", "-q", "HEAD"], workspace=ws,
                        repo=repo, check=False)
    commit = out.stdout.decode().strip() or None if out.exit_code == 0 else None
    out = await run_git(g, [*base, "symbolic-ref", "--short", "-q", "HEAD"], workspace=ws,
                        repo=repo, check=False)
    branch = out.stdout.decode().strip() or None if out.exit_code == 0 else None
    return commit, branch


async def clone(g: GuestClient, rt: Runtime, rec: WorkspaceRecord, url: str, path: str, *,
                branch: str | None, depth: int | None, timeout_s: float) -> GitCloned:
    """Check and clone ``url`` into ``path`` (used by git_clone and workspace_prepare)."""
    allow_file = rt.config.limits.git_allow_file_urls
    checked = gitcmd.check_url(url, allow_file=allow_file)
    repo = gitcmd.check_repo_path(path)
    check_egress(rec, checked)
    argv = gitcmd.clone_argv(checked, repo, branch=branch, depth=depth, allow_file=allow_file)
    started = time.monotonic()
    await run_git(g, argv, workspace=rec.name, repo=None, timeout_s=timeout_s,
                  secrets=checked.secrets)
    commit, head = await head_of(g, rec.name, repo)
    return GitCloned(workspace=rec.name, path=repo, url=checked.shown, branch=head,
                     commit=commit, duration_secs=round(time.monotonic() - started, 3))


def register(app: MCPServer[Any], rt: Runtime) -> None:
    def net_timeout(t: int | None) -> float:
        return float(t or rt.config.limits.git_network_timeout_secs)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=True),
              description=(
        "Clone a git repository into `path` in the workspace (git runs inside it, so the "
        "workspace's network_policy must let it reach the server). URL schemes: https, "
        "ssh, git (file only where the config allows it); `branch` and `depth` as git "
        "clone's. Returns the commit and branch checked out."))
    @tool_errors
    async def git_clone(
        workspace: WorkspaceRef,
        url: GitUrlArg,
        path: RepoPath,
        branch: Branch | None = None,
        depth: Annotated[int, Field(ge=1, le=1_000_000, description=(
            "Shallow clone of this many commits"))] | None = None,
        timeout_secs: NetTimeout | None = None,
    ) -> GitCloned:
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g:
            return await clone(g, rt, rec, url, path, branch=branch, depth=depth,
                               timeout_s=net_timeout(timeout_secs))

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True,
                                          open_world_hint=False), description=(
        "The repository's state: branch, HEAD commit, upstream with ahead/behind counts, "
        "and the staged, modified, untracked and conflicted paths; `dirty` is true when "
        "any of those lists is non-empty."))
    @tool_errors
    async def git_status(workspace: WorkspaceRef, path: RepoPath) -> GitStatus:
        rec = rt.ws.owned(workspace)
        repo = gitcmd.check_repo_path(path)
        async with rt.ws.guest(rec) as g:
            out = await git_text(g, gitcmd.status_argv(repo), workspace=rec.name, repo=repo)
        st = gitcmd.parse_status(out)
        return GitStatus(
            workspace=rec.name, path=repo, branch=st.branch, commit=st.commit,
            upstream=st.upstream, ahead=st.ahead, behind=st.behind, staged=st.staged,
            modified=st.modified, untracked=st.untracked, conflicted=st.conflicted,
            renamed=[Rename(old=a, new=b) for a, b in st.renamed], dirty=st.dirty)

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True,
                                          open_world_hint=False), description=(
        "The repository's uncommitted changes as a unified diff: work tree against the "
        "index, or with staged=true the index against HEAD. stat=true gives per-file "
        "added/deleted line counts instead of the diff text. file_path limits it to one "
        "path (relative to the repository). A diff longer than max_bytes is cut and "
        "`truncated` is true."))
    @tool_errors
    async def git_diff(
        workspace: WorkspaceRef,
        path: RepoPath,
        staged: bool = False,
        stat: bool = False,
        file_path: Annotated[str, Field(min_length=1, max_length=4096, description=(
            "Only this file or directory, relative to the repository"))] | None = None,
        max_bytes: Annotated[int, Field(ge=1, le=4 * 1024 * 1024, description=(
            "Most bytes of diff returned (default 262144)"))] = 256 * 1024,
    ) -> GitDiff:
        rec = rt.ws.owned(workspace)
        repo = gitcmd.check_repo_path(path)
        argv = gitcmd.diff_argv(repo, staged=staged, stat=stat, file_path=file_path)
        async with rt.ws.guest(rec) as g:
            out = await run_git(g, argv, workspace=rec.name, repo=repo,
                                stdout_cap=4 * 1024 * 1024 if stat else max_bytes)
        if stat:
            files = [DiffFile(path=f.path, added=f.added, deleted=f.deleted)
                     for f in gitcmd.parse_numstat(out.stdout.decode("utf-8", "replace"))]
            return GitDiff(workspace=rec.name, path=repo, staged=staged, diff="",
                           encoding="utf-8", files=files, total_bytes=out.stdout_bytes,
                           truncated=out.stdout_truncated)
        data = out.stdout[:max_bytes]
        truncated = out.stdout_truncated or out.stdout_bytes > max_bytes
        text, enc = decode_output(data, truncated)
        return GitDiff(workspace=rec.name, path=repo, staged=staged, diff=text, encoding=enc,
                       files=[], total_bytes=out.stdout_bytes, truncated=truncated)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False),
              description=(
        "Commit the staged changes (add_all=true first stages every change, new and "
        "deleted files included) with `message`; `author` as 'Name <email>' (default: "
        "the workspace's git identity). Returns the new commit's id. Hooks are not run."))
    @tool_errors
    async def git_commit(
        workspace: WorkspaceRef,
        path: RepoPath,
        message: Annotated[str, Field(min_length=1, max_length=64 * 1024,
                                      description="The commit message")],
        add_all: bool = False,
        author: Annotated[str, Field(min_length=3, max_length=400, description=(
            "'Name <email>'"))] | None = None,
    ) -> GitCommitted:
        rec = rt.ws.owned(workspace)
        repo = gitcmd.check_repo_path(path)
        argv = gitcmd.commit_argv(repo, author=author)
        base = gitcmd.base_argv(repo)
        async with rt.ws.guest(rec) as g:
            if add_all:
                await run_git(g, [*base, "add", "--all"], workspace=rec.name, repo=repo)
            await run_git(g, argv, workspace=rec.name, repo=repo, stdin=message.encode())
            commit, branch = await head_of(g, rec.name, repo)
            names = await git_text(g, [*base, "diff-tree", "-r", "--root", "--no-commit-id",
                                       "--name-only", "-z", "HEAD"],
                                   workspace=rec.name, repo=repo)
        if commit is None:  # pragma: no cover - git commit succeeded
            raise GitFailed("the commit left no HEAD", "Check git_status and retry.")
        return GitCommitted(workspace=rec.name, path=repo, commit=commit, branch=branch,
                            summary=message.strip().splitlines()[0] if message.strip() else "",
                            files_changed=len([n for n in names.split("\0") if n]))

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False, open_world_hint=True),
              description=(
        "Push a branch (default: the current one, as git push does) to `remote` (default "
        "origin). force=true overwrites the remote branch; set_upstream=true makes it "
        "the branch's upstream. The remote's URL must use an allowed scheme and be "
        "reachable under the workspace's network_policy. Output has credentials redacted."))
    @tool_errors
    async def git_push(
        workspace: WorkspaceRef,
        path: RepoPath,
        remote: Annotated[str, Field(min_length=1, max_length=100,
                                     description="A configured remote's name")] = "origin",
        branch: Branch | None = None,
        force: bool = False,
        set_upstream: bool = False,
        timeout_secs: NetTimeout | None = None,
    ) -> GitPushed:
        rec = rt.ws.owned(workspace)
        repo = gitcmd.check_repo_path(path)
        allow_file = rt.config.limits.git_allow_file_urls
        argv = gitcmd.push_argv(repo, remote=remote, branch=branch, force=force,
                                set_upstream=set_upstream, allow_file=allow_file)
        async with rt.ws.guest(rec) as g:
            url = await git_text(g, [*gitcmd.base_argv(repo), "remote", "get-url", "--", remote],
                                 workspace=rec.name, repo=repo)
            checked = gitcmd.check_url(url, allow_file=allow_file)
            check_egress(rec, checked)
            out = await run_git(g, argv, workspace=rec.name, repo=repo,
                                timeout_s=net_timeout(timeout_secs), secrets=checked.secrets)
            _, head = await head_of(g, rec.name, repo)
        text = (out.stdout + out.stderr).decode("utf-8", "replace")
        return GitPushed(workspace=rec.name, path=repo, remote=remote, branch=branch or head,
                         output=gitcmd.redact(text, checked.secrets).strip())
