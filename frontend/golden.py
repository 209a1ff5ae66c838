"""workspace_prepare: a golden workspace, ready for ``workspace_fork``.

Create the workspace → set its network policy → clone → run the setup
commands in order → snapshot ``golden`` (with memory: forks of it resume
instead of booting).  The arguments are recorded in the catalog's ``golden``
table, so the same call again returns the existing golden workspace, and a
call with changed arguments is refused unless ``rebuild``.

Nothing half-prepared survives: a failed step (or a cancellation, or any
error) destroys the workspace, and the result carries the failed step's
output.  A frontend that dies mid-preparation leaves the record in
``preparing``; the next call for that name destroys the leftover and starts
again (unless the session that was preparing it still runs).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import gitcmd
from .errors import FrontendError
from .execution import run_exec
from .gitops import GitFailed
from .results import utc
from .results_git import Prepared, StepOutput
from .sessions import session_alive
from .tools_git import clone, head_of

if TYPE_CHECKING:
    from .server import Runtime

log = structlog.get_logger("agentiso.frontend.golden")

SNAPSHOT = "golden"
#: Output of each step kept in the result (the rest is cut).
STEP_OUTPUT_CAP = 16 * 1024
Progress = Callable[[str], Awaitable[None]]


class PrepareError(FrontendError):
    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


def prepare_args(*, image: str, git_url: str | None, path: str, branch: str | None,
                 setup_commands: list[str], allow_internet: bool,
                 allow: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What identifies a preparation (pure).  The URL is kept as a digest: it
    may carry credentials, and the catalog must never hold them."""
    return {
        "image": image,
        "git_url_sha256": hashlib.sha256(git_url.encode()).hexdigest() if git_url else None,
        "path": path, "branch": branch, "setup_commands": list(setup_commands),
        "allow_internet": allow_internet, "allow": allow,
    }


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The argument names whose values differ (pure)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _step(name: str, exit_code: int | None, stdout: str, stderr: str, dur: float) -> StepOutput:
    return StepOutput(step=name, exit_code=exit_code, stdout=stdout[-STEP_OUTPUT_CAP:],
                      stderr=stderr[-STEP_OUTPUT_CAP:], duration_secs=round(dur, 3))


#: Golden workspaces this process is preparing now, by (orchestrator, name):
#: a second call meanwhile must not take the first one's work for a leftover.
_BUSY: set[tuple[int, str]] = set()


async def prepare(rt: Runtime, *, name: str, **kw: Any) -> Prepared:
    """Prepare golden workspace ``name`` (or return the one prepared with the
    same arguments); see the module's docstring."""
    key = (id(rt.ws), name)
    if key in _BUSY:
        raise PrepareError(f"golden workspace {name!r} is being prepared by an earlier call",
                           "Wait for that call to finish, then call again.")
    _BUSY.add(key)
    try:
        return await _prepare(rt, name=name, **kw)
    finally:
        _BUSY.discard(key)


async def _prepare(
    rt: Runtime, *, name: str, image: str, git_url: str | None, path: str,
    branch: str | None, setup_commands: list[str], timeout_secs: int, allow_internet: bool,
    allow: list[dict[str, Any]] | None, rebuild: bool, progress: Progress,
) -> Prepared:
    ws = rt.ws
    repo = gitcmd.check_repo_path(path)
    if git_url is not None:
        gitcmd.check_url(git_url, allow_file=rt.config.limits.git_allow_file_urls)
    args = prepare_args(image=image, git_url=git_url, path=repo, branch=branch,
                        setup_commands=setup_commands, allow_internet=allow_internet,
                        allow=allow)
    existing = ws.catalog.find_workspace(name)
    if existing is not None:
        golden = ws.catalog.get_golden(existing.id)
        if golden is None:
            raise PrepareError(f"a workspace named {name!r} exists and is not a golden "
                               "workspace", "Choose another name, or destroy that workspace.")
        if golden["state"] == "preparing" and existing.session != ws.session.id and \
                existing.session and session_alive(ws.config.state_dir, existing.session):
            raise PrepareError(f"golden workspace {name!r} is being prepared by another "
                               "session", "Wait for it to finish, then call again.")
        same = golden["args"] == args
        has_snapshot = any(n.name == SNAPSHOT for n in ws.catalog.list_snapshots(existing.id))
        # A ready one whose snapshot was deleted since is prepared again.
        if golden["state"] == "ready" and not rebuild and (has_snapshot or not same):
            if not same:
                keys = ", ".join(changed_keys(golden["args"], args))
                raise PrepareError(
                    f"golden workspace {name!r} was prepared with other arguments ({keys})",
                    "Call again with rebuild=true to prepare it anew (it is destroyed "
                    "first), or use another name.")
            rec = ws.owned(name)
            return Prepared(name=rec.name, id=rec.id, ok=True, reused=True, snapshot=SNAPSHOT,
                            path=repo, commit=golden["commit_id"],
                            prepared_at=utc(golden["updated_at"]), steps=[], failed_step=None)
        if golden["state"] == "preparing" and existing.session != ws.session.id:
            await ws.adopt(existing.id)  # a dead session's leftover: ours to clear
        await progress(f"destroying the previous {name!r}")
        await ws.destroy(existing.id)

    await progress(f"creating workspace {name!r} from image {image}")
    d = rt.config.defaults
    made = await ws.create(name=name, image=image, vcpus=d.vcpus, memory_mb=d.memory_mb,
                           disk_gb=d.disk_gb, allow_internet=allow_internet)
    rec = made.record
    deadline = time.monotonic() + timeout_secs
    steps: list[StepOutput] = []
    try:
        ws.catalog.set_golden(rec.id, args, "preparing")
        if allow is not None:
            await ws.set_network(rec.id, allow_internet=allow_internet, allow=allow,
                                 peers=None, groups=None)
        rec = ws.owned(rec.id)
        commit, failed = None, None
        async with ws.guest(rec) as g:
            if git_url is not None:
                await progress("cloning the repository")
                t0 = time.monotonic()
                try:
                    cloned = await clone(g, rt, rec, git_url, repo, branch=branch, depth=None,
                                         timeout_s=max(1.0, deadline - time.monotonic()))
                    steps.append(_step("clone", 0, "", "", cloned.duration_secs))
                except GitFailed as exc:
                    failed = _step("clone", exc.exit_code, exc.stdout,
                                   f"{exc.cause}\n{exc.stderr}", time.monotonic() - t0)
            else:
                await g.mkdir(repo, parents=True, exist_ok=True)
            for i, cmd in enumerate(setup_commands if failed is None else [], 1):
                await progress(f"setup {i}/{len(setup_commands)}: {cmd[:80]}")
                left = deadline - time.monotonic()
                if left < 1:
                    failed = _step(cmd, None, "", f"timeout_secs ({timeout_secs}) ran out "
                                   "before this command", 0.0)
                    break
                r = await run_exec(g, command=cmd, workdir=repo, env=dict(rec.env),
                                   timeout_s=left, stdin=b"", cap=STEP_OUTPUT_CAP,
                                   spill_max=0)
                step = _step(cmd, r.exit_code, r.stdout, r.stderr, r.duration_secs)
                if r.exit_code != 0 or r.timed_out:
                    failed = step
                    break
                steps.append(step)
            if failed is None:
                if git_url is not None:
                    commit, _ = await head_of(g, rec.name, repo)
                await g.sync()
        if failed is not None:
            return await _give_up(rt, rec.id, name, steps, failed)
        await progress("taking the golden snapshot")
        await ws.snapshot_create(rec.id, SNAPSHOT, "workspace_prepare", include_memory=True)
        ws.catalog.set_golden(rec.id, args, "ready", commit)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _destroy_quietly(rt, rec.id, exc)
        raise
    return Prepared(name=rec.name, id=rec.id, ok=True, reused=False, snapshot=SNAPSHOT,
                    path=repo, commit=commit, prepared_at=utc(time.time()), steps=steps,
                    failed_step=None)


async def _give_up(rt: Runtime, wid: str, name: str, steps: list[StepOutput],
                   failed: StepOutput) -> Prepared:
    await _destroy_quietly(rt, wid, None)
    return Prepared(name=name, id=None, ok=False, reused=False, snapshot=None, path=None,
                    commit=None, prepared_at=None, steps=steps, failed_step=failed)


async def _destroy_quietly(rt: Runtime, wid: str, exc: BaseException | None) -> None:
    """Destroy the half-prepared workspace (its golden record goes with it)."""
    try:
        await rt.ws.destroy(wid)
    except Exception as err:
        log.warning("prepare_undo_failed", workspace=wid, error=str(err),
                    cause=str(exc) if exc else "a step failed")
