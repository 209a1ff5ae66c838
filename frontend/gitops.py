"""Git inside a workspace, the I/O half: run a git argv (built by
``gitcmd``) with the guest agent's exec, never a shell, and turn a failure
into a two-line error with credentials redacted.  Shared by the git tools,
``workspace_prepare`` and ``workspace_merge``."""

from __future__ import annotations

import posixpath
import re
import time

import structlog

from agentiso.protocol import errors as pe

from .errors import FrontendError
from .gitcmd import GIT_ENV, redact
from .guest_client import ExecOutcome, GuestClient

log = structlog.get_logger("agentiso.frontend.git")

#: How long a local git step (status, diff, commit, bundle, merge) may take.
LOCAL_TIMEOUT_S = 120.0
#: Output kept from a git run that is not itself the result (errors, bundles' chatter).
SMALL_CAP = 64 * 1024

_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"not a git repository|No such file or directory|cannot change to"),
     "Check path: it must be the repository's top directory (git_clone makes one)."),
    (re.compile(r"(?i)authentication failed|could not read username|permission denied "
                r"\(publickey|access denied|403"),
     "The server wants credentials: put a token in the URL or configure a credential "
     "helper in the workspace."),
    (re.compile(r"(?i)could not resolve host|connection refused|timed out|unable to connect|"
                r"unable to look up|network is unreachable|no route to host|connection reset|"
                r"recv failure|unable to access|could not read from remote"),
     "Check the URL (scheme and port), and that the workspace's network_policy "
     "(allow_internet and its allow-list) lets it reach that host and port."),
    (re.compile(r"nothing to commit|no changes added to commit"),
     "Change files first (add_all=true also stages new and deleted files)."),
    (re.compile(r"already exists and is not an empty directory"),
     "Clone into another path, or remove that directory first."),
    (re.compile(r"(?i)rejected|non-fast-forward|fetch first"),
     "The remote has commits you do not: pull or merge them first, or push with force."),
    (re.compile(r"transport '.*' not allowed|unsupported protocol|protocol .* is not supported"),
     "Use an https://, ssh:// or git:// URL."),
)


class GitFailed(FrontendError):
    """A git step failed in the workspace: ``cause`` (with git's own words,
    redacted) then ``hint``; ``stdout``/``stderr`` keep the (redacted) output."""

    def __init__(self, cause: str, hint: str, *, exit_code: int | None = None,
                 stdout: str = "", stderr: str = "") -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


def hint_for(text: str) -> str:
    """What to do after git said ``text``."""
    for pat, hint in _HINTS:
        if pat.search(text):
            return hint
    return "Fix what git reports above and retry."


def _git_words(argv: list[str]) -> str:
    """``git <subcommand>`` for messages (past the ``-C`` and ``-c`` options)."""
    i = 1
    while i < len(argv) and argv[i] in ("-C", "-c"):
        i += 2
    return "git " + (argv[i] if i < len(argv) else "")


def last_lines(data: bytes, n: int = 6, width: int = 600, secrets: tuple[str, ...] = ()) -> str:
    text = redact(data.decode("utf-8", "replace"), secrets)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-width:]


async def run_git(g: GuestClient, argv: list[str], *, workspace: str, repo: str | None,
                  stdin: bytes = b"", timeout_s: float = LOCAL_TIMEOUT_S,
                  stdout_cap: int = SMALL_CAP, check: bool = True,
                  secrets: tuple[str, ...] = ()) -> ExecOutcome:
    """Run ``argv`` in the guest (no shell).  With ``repo``, git looks for the
    repository only in that directory (``GIT_CEILING_DIRECTORIES`` is its
    parent), so a path inside another repository is not one.  ``check``: a
    non-zero exit raises :class:`GitFailed`.  ``secrets`` (a URL's
    credentials) are redacted from what the error carries, with the rest."""
    env = dict(GIT_ENV)
    if repo is not None:
        env["GIT_CEILING_DIRECTORIES"] = posixpath.dirname(repo) or "/"
    started = time.monotonic()
    try:
        out = await g.exec(argv, cwd="/", env=env, stdin=stdin, timeout_s=timeout_s,
                           stdout_cap=stdout_cap, stderr_cap=SMALL_CAP)
        log.debug("git_ran", workspace=workspace, command=_git_words(argv),
                 exit_code=out.exit_code, secs=round(time.monotonic() - started, 3))
    except pe.NotFound:
        raise GitFailed(f"git is not installed in workspace {workspace!r}",
                        "Use a workspace made from the dev image (workspace_create "
                        "image='dev').") from None
    if out.timed_out:
        raise GitFailed(f"{_git_words(argv)} in {workspace!r} did not finish within "
                        f"{timeout_s:g} s (it was killed): "
                        f"{last_lines(out.stderr, secrets=secrets)}",
                        hint_for(out.stderr.decode("utf-8", "replace") + " timed out"),
                        stderr=redact(out.stderr.decode("utf-8", "replace"), secrets))
    if check and out.exit_code != 0:
        said = (last_lines(out.stderr, secrets=secrets)
                or last_lines(out.stdout, secrets=secrets))
        raise GitFailed(
            f"{_git_words(argv)} failed in {workspace!r} (exit {out.exit_code}): {said}",
            hint_for(said), exit_code=out.exit_code,
            stdout=redact(out.stdout.decode("utf-8", "replace"), secrets),
            stderr=redact(out.stderr.decode("utf-8", "replace"), secrets))
    return out


async def git_text(g: GuestClient, argv: list[str], *, workspace: str, repo: str | None,
                   **kw: float) -> str:
    """:func:`run_git`'s stdout as text, stripped."""
    out = await run_git(g, argv, workspace=workspace, repo=repo, **kw)  # type: ignore[arg-type]
    return out.stdout.decode("utf-8", "replace").strip()
