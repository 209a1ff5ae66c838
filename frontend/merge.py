"""workspace_merge: bring the commits of fork workspaces into a target
workspace's repository, with no network path between workspaces.

Per source, in the order given:

1. in the source, ``git bundle create`` of its HEAD, less the newest commit
   of the target's (first-parent) history that the source has (the fork
   point, usually; without one, the whole history);
2. the bundle moves through the frontend (download from the source's agent,
   streamed into an upload to the target's, bounded memory);
3. in the target, ``git fetch`` from the bundle into ``refs/agentiso/merge/<source>``;
4. per strategy: ``sequential`` merges it into the current branch (a
   fast-forward where possible); ``cherry-pick`` replays the source's new
   commits onto the current branch; ``branch-per-source`` makes (or moves)
   the branch ``merge/<source>`` and leaves the current branch alone.

A conflict aborts that source's merge or cherry-pick (the target is left as
it was before that source, clean) and is reported with the conflicting
files; the next source is still tried.  The bundles and the temporary refs
are removed whatever happens.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

import anyio
import structlog

from . import gitcmd
from .catalog import WorkspaceRecord
from .errors import FrontendError
from .gitops import GitFailed, git_text, run_git
from .guest_client import GuestClient
from .results_git import MergeItem, MergeResult
from .toolerrors import describe

if TYPE_CHECKING:
    from .server import Runtime

log = structlog.get_logger("agentiso.frontend.merge")

Strategy = Literal["sequential", "branch-per-source", "cherry-pick"]
BUNDLE_DIR = "/var/tmp"
REF_PREFIX = "refs/agentiso/merge/"
BRANCH_PREFIX = "merge/"
#: How far back the target's history is searched for a commit a source shares.
ANCESTRY = 200


class MergeRefused(FrontendError):
    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


def check_sources(sources: list[str], target: str) -> None:
    """Each source once, none the target (pure; names as given)."""
    if len(set(sources)) != len(sources):
        raise MergeRefused("a source is named twice", "Name each source workspace once.")
    if target in sources:
        raise MergeRefused(f"the target {target!r} is also a source",
                           "Name the target once, as target.")


def shared_commit(candidates: list[str], batch_check: str) -> str | None:
    """The first of ``candidates`` (the target's first-parent history, newest
    first) that ``git cat-file --batch-check`` found in the source (pure)."""
    found = {line.strip() for line in batch_check.splitlines() if not line.endswith(" missing")}
    return next((c for c in candidates if c in found), None)


async def move_file(src: GuestClient, src_path: str, dst: GuestClient, dst_path: str) -> int:
    """Stream a file from one workspace to another through the frontend."""
    send, recv = anyio.create_memory_object_stream[bytes](4)

    async def chunks() -> AsyncIterator[bytes]:
        async with recv:
            async for item in recv:
                yield item

    size = 0
    async with anyio.create_task_group() as tg:
        async def pull() -> None:
            async with send:
                await src.download(src_path, send.send)

        tg.start_soon(pull)
        size = (await dst.upload(dst_path, chunks(), perm=0o600)).size
    return size


class _Merge:
    def __init__(self, rt: Runtime, target: WorkspaceRecord, repo: str, strategy: Strategy,
                 tg: GuestClient) -> None:
        self.rt, self.target, self.repo, self.strategy, self.tg = rt, target, repo, strategy, tg
        self.base = ""
        self.ancestry: list[str] = []

    def argv(self, *args: str) -> list[str]:
        return [*gitcmd.base_argv(self.repo), *args]

    async def t(self, *args: str) -> str:
        return await git_text(self.tg, self.argv(*args), workspace=self.target.name,
                              repo=self.repo)

    async def head(self) -> str:
        return await self.t("rev-parse", "--verify", "HEAD")

    async def start(self) -> None:
        out = await self.t("status", "--porcelain=v2", "-z", "--untracked-files=no")
        st = gitcmd.parse_status(out)
        if st.dirty:
            raise MergeRefused(
                f"the target {self.target.name!r} has uncommitted changes in {self.repo}: "
                f"{', '.join((st.staged + st.modified + st.conflicted)[:10])}",
                "Commit them (git_commit) or discard them first.")
        self.base = await self.head()
        # Candidates for the newest commit a source shares with the target
        # (its bundle then carries only what the target lacks).
        self.ancestry = (await self.t("rev-list", f"--max-count={ANCESTRY}", "--first-parent",
                                      "HEAD")).split()

    async def one(self, src: WorkspaceRecord) -> MergeItem:
        token = secrets.token_hex(6)
        bundle = f"{BUNDLE_DIR}/agentiso-merge-{token}.bundle"
        ref = REF_PREFIX + src.name
        async with self.rt.ws.guest(src) as sg:
            try:
                sargv = [*gitcmd.base_argv(self.repo)]
                new = await self._export(sg, src, sargv, bundle)
                if new == 0:
                    return MergeItem(source=src.name, status="nothing", commits=[], branch=None,
                                     conflicts=[], error=None)
                await move_file(sg, bundle, self.tg, bundle)
            finally:
                with anyio.CancelScope(shield=True):
                    await _remove(sg, bundle)
        try:
            fetch = [*gitcmd.base_argv(self.repo, allow_file=True), "fetch", "--no-tags",
                     "--quiet", bundle, f"+HEAD:{ref}"]
            await run_git(self.tg, fetch, workspace=self.target.name, repo=self.repo)
            return await self._apply(src, ref)
        finally:
            with anyio.CancelScope(shield=True):
                await _remove(self.tg, bundle)
                await run_git(self.tg, self.argv("update-ref", "-d", ref),
                              workspace=self.target.name, repo=self.repo, check=False)

    async def _export(self, sg: GuestClient, src: WorkspaceRecord, base: list[str],
                      bundle: str) -> int:
        """Bundle the source's new commits; how many there are (0: no bundle)."""
        known = await run_git(sg, [*base, "cat-file", "--batch-check=%(objectname)"],
                              workspace=src.name, repo=self.repo,
                              stdin="".join(c + "\n" for c in self.ancestry).encode())
        shared = shared_commit(self.ancestry, known.stdout.decode("utf-8", "replace"))
        revs = ["HEAD", f"^{shared}"] if shared else ["HEAD"]
        count = await git_text(sg, [*base, "rev-list", "--count", *revs], workspace=src.name,
                               repo=self.repo)
        if int(count or 0) == 0:
            return 0
        await run_git(sg, [*base, "bundle", "create", "--quiet", bundle, *revs],
                      workspace=src.name, repo=self.repo)
        return int(count)

    async def _apply(self, src: WorkspaceRecord, ref: str) -> MergeItem:
        before = await self.head()
        if self.strategy == "branch-per-source":
            branch = BRANCH_PREFIX + src.name
            await self.t("branch", "--force", "--", branch, ref)
            commits = (await self.t("rev-list", "--reverse", f"{before}..{ref}")).split()
            return MergeItem(source=src.name, status="branch", commits=commits, branch=branch,
                             conflicts=[], error=None)
        picks = (await self.t("rev-list", "--reverse", "--no-merges", f"HEAD..{ref}")).split()
        if not picks and self.strategy == "cherry-pick":
            return MergeItem(source=src.name, status="nothing", commits=[], branch=None,
                             conflicts=[], error=None)
        if self.strategy == "sequential":
            op = self.argv("merge", "--no-edit", "-m", f"Merge workspace {src.name}", ref)
            abort = self.argv("merge", "--abort")
        else:
            op = self.argv("cherry-pick", "--allow-empty", *picks)
            abort = self.argv("cherry-pick", "--abort")
        out = await run_git(self.tg, op, workspace=self.target.name, repo=self.repo,
                            check=False)
        if out.exit_code != 0:
            conflicts = gitcmd.parse_unmerged(await self.t(
                "diff", "--name-only", "--diff-filter=U", "-z"))
            await self._restore(abort, before)
            if not conflicts:
                said = (out.stderr or out.stdout).decode("utf-8", "replace")
                raise GitFailed(f"{self.strategy} of {src.name!r} failed: "
                                f"{gitcmd.redact(said.strip())[-600:]}",
                                "The target was left as it was; check git_status.")
            return MergeItem(source=src.name, status="conflict", commits=[], branch=None,
                             conflicts=conflicts, error=None)
        commits = (await self.t("rev-list", "--reverse", "--no-merges",
                                f"{before}..HEAD")).split()
        return MergeItem(source=src.name, status="applied" if commits else "nothing",
                         commits=commits, branch=None, conflicts=[], error=None)

    async def _restore(self, abort: list[str], before: str) -> None:
        """Abort the operation; if anything is left, reset to ``before``."""
        await run_git(self.tg, abort, workspace=self.target.name, repo=self.repo, check=False)
        st = gitcmd.parse_status(await self.t("status", "--porcelain=v2", "-z",
                                              "--untracked-files=no"))
        if st.dirty or await self.head() != before:
            await self.t("reset", "--hard", "--quiet", before)


async def _remove(g: GuestClient, path: str) -> None:
    try:
        await g.remove(path, missing_ok=True)
    except Exception as exc:
        log.warning("bundle_not_removed", path=path, error=str(exc))


async def merge(rt: Runtime, *, sources: list[str], target: str, path: str,
                strategy: Strategy) -> MergeResult:
    repo = gitcmd.check_repo_path(path)
    check_sources(sources, target)
    trec = rt.ws.owned(target)
    srecs = [rt.ws.owned(s) for s in sources]
    if trec.id in {s.id for s in srecs}:
        raise MergeRefused(f"the target {trec.name!r} is also a source",
                           "Name the target once, as target.")
    items: list[MergeItem] = []
    async with rt.ws.guest(trec) as tg:
        m = _Merge(rt, trec, repo, strategy, tg)
        await m.start()
        for src in srecs:
            try:
                items.append(await m.one(src))
            except Exception as exc:
                items.append(MergeItem(source=src.name, status="error", commits=[],
                                       branch=None, conflicts=[],
                                       error=gitcmd.redact(describe(exc, "workspace_merge"))))
        head = await m.head()
    return MergeResult(target=trec.name, path=repo, strategy=strategy, base=m.base, head=head,
                       sources=items)
