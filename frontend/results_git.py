"""Structured results of the git, exec_parallel, workspace_prepare and
workspace_merge tools (their output schemas).  Same rules as ``results.py``:
aware UTC datetimes, no tuples or bytes, a description on every field an
agent acts on."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .results import Encoding


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GitCloned(_Model):
    workspace: str
    path: str = Field(description="The repository's directory in the workspace")
    url: str = Field(description="The URL cloned, credentials redacted")
    branch: str | None = Field(description="The branch checked out (null: detached HEAD)")
    commit: str | None = Field(description="The commit checked out (null: empty repository)")
    duration_secs: float


class Rename(_Model):
    old: str
    new: str


class GitStatus(_Model):
    workspace: str
    path: str
    branch: str | None = Field(description="Current branch (null: detached HEAD)")
    commit: str | None = Field(description="HEAD commit (null: no commit yet)")
    upstream: str | None = Field(description="The branch's upstream, e.g. origin/main")
    ahead: int = Field(description="Commits on the branch not on its upstream")
    behind: int = Field(description="Commits on the upstream not on the branch")
    staged: list[str] = Field(description="Paths with changes in the index (to be committed)")
    modified: list[str] = Field(description="Paths changed in the work tree, not staged")
    untracked: list[str]
    conflicted: list[str] = Field(description="Paths with unresolved merge conflicts")
    renamed: list[Rename]
    dirty: bool = Field(description="Anything staged, modified, untracked or conflicted")


class DiffFile(_Model):
    path: str
    added: int | None = Field(description="Lines added (null: binary file)")
    deleted: int | None = Field(description="Lines deleted (null: binary file)")


class GitDiff(_Model):
    workspace: str
    path: str
    staged: bool
    diff: str = Field(description="The unified diff (empty with stat=true)")
    encoding: Encoding
    files: list[DiffFile] = Field(description="Per-file line counts (with stat=true)")
    total_bytes: int = Field(description="Size of the whole diff output")
    truncated: bool = Field(description="The diff was longer than max_bytes and was cut")


class GitCommitted(_Model):
    workspace: str
    path: str
    commit: str = Field(description="The new commit's id")
    branch: str | None
    summary: str = Field(description="The message's first line")
    files_changed: int


class GitPushed(_Model):
    workspace: str
    path: str
    remote: str
    branch: str | None
    output: str = Field(description="git's report (porcelain), credentials redacted")


class ParallelItem(_Model):
    workspace: str
    command: str
    ok: bool = Field(description="It ran and exited 0")
    exit_code: int | None = Field(description="null: killed by a signal, timed out or not run")
    timed_out: bool
    stdout: str
    stderr: str
    stdout_encoding: Encoding
    stderr_encoding: Encoding
    stdout_truncated: bool
    stderr_truncated: bool
    duration_secs: float
    error: str | None = Field(description="Why it could not run (two lines: cause, what to do)")


class ParallelSummary(_Model):
    total: int
    succeeded: int = Field(description="Ran and exited 0")
    failed: int = Field(description="Ran and exited non-zero, or timed out")
    errors: int = Field(description="Could not run (stopped workspace, unreachable agent, ...)")
    wall_secs: float = Field(description="Wall time of the whole call")


class ParallelResult(_Model):
    results: list[ParallelItem] = Field(description="One per workspace, in the order given")
    summary: ParallelSummary


class StepOutput(_Model):
    step: str = Field(description="'clone' or the setup command")
    exit_code: int | None
    stdout: str
    stderr: str
    duration_secs: float


class Prepared(_Model):
    name: str = Field(description="The golden workspace (fork it with workspace_fork)")
    id: str | None
    ok: bool = Field(description="false: a step failed and nothing was kept (see failed_step)")
    reused: bool = Field(description="An existing golden workspace with the same arguments")
    snapshot: str | None = Field(description="The snapshot to fork from ('golden')")
    path: str | None = Field(description="Where the repository was cloned")
    commit: str | None = Field(description="The repository's HEAD in the golden snapshot")
    prepared_at: datetime | None
    steps: list[StepOutput] = Field(description="What ran (empty when reused)")
    failed_step: StepOutput | None = Field(description="The step that failed, with its output")


class MergeItem(_Model):
    source: str
    status: Literal["applied", "branch", "nothing", "conflict", "error"] = Field(
        description="applied: commits are on the target's branch; branch: on their own "
        "branch; nothing: no new commits; conflict: not applied (see conflicts)")
    commits: list[str] = Field(description="Commits brought into the target")
    branch: str | None = Field(description="The branch made (branch-per-source)")
    conflicts: list[str] = Field(description="Files that conflicted (the target was left clean)")
    error: str | None


class MergeResult(_Model):
    target: str
    path: str
    strategy: Literal["sequential", "branch-per-source", "cherry-pick"]
    base: str = Field(description="The target's HEAD before the merge")
    head: str = Field(description="The target's HEAD after the merge")
    sources: list[MergeItem]
