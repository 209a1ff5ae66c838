"""Git inside a workspace, the pure half: argument checks, argv builders,
output parsers and credential redaction (no I/O; the tools run the argv in
the guest with the agent's exec, never through a shell).

Rules every git argv built here follows:

* it starts with :func:`base_argv`: ``git -C <repo>`` plus ``-c`` settings
  that only the allow-listed transports may be used (``protocol.allow=never``
  then ``protocol.<scheme>.allow=always`` per scheme), so ``ext::``, ``fd::``
  and any scheme not on the list are refused by git itself too, submodules
  and redirects included;
* every user-given value that git could read as an option is either checked
  not to start with ``-`` or placed after ``--``;
* pathspecs are literal (``GIT_LITERAL_PATHSPECS``), so ``:(top)`` magic
  cannot widen a path past the repository.

Whatever comes back (output, errors, logs) goes through :func:`redact`.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import FrontendError

#: Transports an agent may use; ``file`` only when the config allows it (tests).
NETWORK_SCHEMES = ("https", "ssh", "git")
#: Environment of every git run: never prompt (no terminal), literal pathspecs,
#: a fallback e-mail for commits made where no identity is configured.
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "SSH_ASKPASS": "/bin/false",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "GIT_LITERAL_PATHSPECS": "1",
    "GIT_PAGER": "cat",
    "LC_ALL": "C",
    "EMAIL": "agent@agentiso.invalid",
}
_DEFAULT_PORTS = {"https": 443, "ssh": 22, "git": 9418}
#: Anything a shell (or git's own URL helpers) could give a meaning to.
_SHELL_META = set(";&|`$<>()\\\"'*?[]{}!~#\n\r\t ")
_REF_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}\Z")
_REMOTE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_AUTHOR_RE = re.compile(r"\A[^<>\n\r\0]{1,200} <[^<>\s\0]{1,200}>\Z")
_SCP_RE = re.compile(r"\A(?:[A-Za-z0-9._-]+@)?([A-Za-z0-9.-]+):(?!//)(.+)\Z")


class GitArgError(FrontendError):
    """A git tool argument refused before anything ran: ``cause`` then ``hint``."""

    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


# --- redaction -------------------------------------------------------------------------

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
_TOKEN_PATTERNS = (
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
)
_KEY_VALUE = re.compile(
    r"(?i)\b((?:access[_-]?)?token|password|passwd|secret|api[_-]?key|auth)"
    r"(\s*[=:]\s*)([^\s'\"&]+)"
)
REDACTED = "***"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with credentials replaced by ``***``: the ``secrets`` known to
    be in play (a URL's user-info, wherever git echoes it, e.g. "unable to
    look up user:tok@host"), the user-info of URLs (``https://user:tok@host``
    → ``https://***@host``), well-known token formats (GitHub, GitLab, Slack,
    AWS keys, bearer/basic auth) and ``token=...``/``password: ...`` pairs."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    for pat in _TOKEN_PATTERNS:
        text = pat.sub(lambda m: (m.group(0).split()[0] + " " + REDACTED
                                  if " " in m.group(0) else REDACTED), text)
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


# --- argument checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class GitUrl:
    """A checked clone URL: its scheme, host and port (for the egress check)."""

    url: str
    scheme: str
    host: str
    port: int | None

    @property
    def shown(self) -> str:
        """The URL as it may be shown or logged (credentials redacted)."""
        return redact(self.url, self.secrets)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The URL's user-info and its parts, raw and %-decoded: never shown."""
        return url_secrets(self.url)


def url_secrets(url: str) -> tuple[str, ...]:
    """What of ``url`` must never be shown: its user-info (``user:password``)
    and the password, as written and %-decoded; a bare user name only for
    https (a token given as the user), not for ssh (``git@``: no secret, and
    redacting "git" would garble every message)."""
    if "://" not in url:
        return ()
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    userinfo = netloc.rpartition("@")[0]
    if not userinfo:
        return ()
    user, _, password = userinfo.partition(":")
    if password:
        found = {userinfo, unquote(userinfo), password, unquote(password)}
    elif url.lower().startswith("https://"):
        found = {user, unquote(user)}  # a token given as the user name
    else:
        return ()  # ssh://git@host: a user name, no secret
    return tuple(sorted(found))


def check_url(url: str, *, allow_file: bool = False) -> GitUrl:
    """Refuse a URL git could turn into a command or a local read: only
    ``https://``, ``ssh://`` (or scp-like ``user@host:path``), ``git://`` and,
    with ``allow_file``, ``file://``; no shell metacharacters, no leading
    ``-``, no ``ext::``/``fd::`` transports, a host for network schemes."""
    shown = redact(url, url_secrets(url))
    hint = "Give an https://, ssh:// or git:// URL of the repository."
    if not url or len(url) > 2048:
        raise GitArgError("the git URL is empty or longer than 2048 characters", hint)
    if url.startswith("-"):
        raise GitArgError(f"the git URL {shown!r} starts with '-' (git would read an option)",
                          hint)
    if "::" in url.split("/", 1)[0] or url.lower().startswith(("ext::", "fd::")):
        raise GitArgError(f"the git URL {shown!r} names a remote helper transport "
                          "(<transport>::): those run commands", hint)
    bad = sorted({c for c in url if c in _SHELL_META or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise GitArgError(f"the git URL {shown!r} contains characters that are not allowed "
                          f"in a URL here: {''.join(bad)!r}", hint)
    if "://" not in url:
        scp = _SCP_RE.match(url)
        if scp is None:
            raise GitArgError(f"{shown!r} is not a URL (a local path is not allowed)", hint)
        return GitUrl(url, "ssh", scp.group(1), None)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    allowed = (*NETWORK_SCHEMES, "file") if allow_file else NETWORK_SCHEMES
    if scheme not in allowed:
        extra = "" if allow_file else " (file:// only where the config allows it)"
        raise GitArgError(f"the URL scheme {scheme!r} of {shown!r} is not allowed{extra}",
                          f"Use one of: {', '.join(s + '://' for s in allowed)}.")
    if scheme == "file":
        return GitUrl(url, scheme, "", None)
    if scheme == "git" and "@" in parts.netloc:
        raise GitArgError(f"the git:// URL {shown!r} carries credentials, which that "
                          "protocol has no use for (git would try them as a host name)",
                          "Drop the user-info from the URL, or use https:// with a token.")
    host = parts.hostname or ""
    if not host or host.startswith("-"):
        raise GitArgError(f"the git URL {shown!r} has no usable host", hint)
    try:
        port = parts.port
    except ValueError:
        raise GitArgError(f"the git URL {shown!r} has an invalid port", hint) from None
    return GitUrl(url, scheme, host, port)


def check_repo_path(path: str) -> str:
    """The repository's directory in the guest: absolute, normalised (no
    ``.``/``..`` parts, no ``//``), not ``/`` itself, no control characters."""
    hint = "Give the repository's absolute directory, e.g. /root/repo."
    if not path.startswith("/") or len(path) > 1024:
        raise GitArgError(f"path {path!r} is not an absolute path of at most 1024 "
                          "characters", hint)
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise GitArgError(f"path {path!r} contains control characters", hint)
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = norm[1:]
    if norm != path.rstrip("/") or norm == "/" or any(p in ("..", ".") for p in path.split("/")):
        raise GitArgError(f"path {path!r} is not a plain directory path (it must have no "
                          "'.', '..' or repeated '/' and not be '/')", hint)
    return norm


def check_file_path(file_path: str) -> str:
    """A path inside the repository: relative, no ``..`` part, no leading ``-``."""
    hint = "Give a path relative to the repository's top directory, without '..'."
    if not file_path or len(file_path) > 4096 or file_path.startswith(("/", "-")):
        raise GitArgError(f"file_path {file_path!r} must be relative to the repository "
                          "and not start with '-'", hint)
    if any(ord(c) < 32 for c in file_path):
        raise GitArgError(f"file_path {file_path!r} contains control characters", hint)
    if ".." in file_path.split("/"):
        raise GitArgError(f"file_path {file_path!r} leaves the repository ('..')", hint)
    return file_path


def check_ref(name: str, what: str = "branch") -> str:
    """A branch name git accepts (check-ref-format's rules, more strictly)."""
    if (not _REF_RE.match(name) or ".." in name or "@{" in name or name.endswith((".", "/",
            ".lock")) or "//" in name or "/." in name):
        raise GitArgError(f"{what} {name!r} is not a valid name here",
                          "Use letters, digits and . _ / + - (not starting with '-', no '..').")
    return name


def check_remote(name: str) -> str:
    if not _REMOTE_RE.match(name):
        raise GitArgError(f"remote {name!r} is not a remote name",
                          "Give the name of a configured remote, e.g. origin.")
    return name


def check_author(author: str) -> str:
    if not _AUTHOR_RE.match(author):
        raise GitArgError(f"author {author!r} is not of the form 'Name <email>'",
                          "Give the author as 'Name <email>'.")
    return author


def egress_refusal(url: GitUrl, *, allow_internet: bool, allow: list[dict[str, object]],
                   has_peers: bool) -> str | None:
    """Why the workspace's policy cannot reach ``url`` (None: it may, or
    cannot be told here: a host name, or peers that may serve it).  Only IP
    literals are judged; the helper's rules are the enforcement either way."""
    if url.scheme == "file" or has_peers:
        return None
    try:
        ip = ipaddress.ip_address(url.host.strip("[]"))
    except ValueError:
        return None
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    if not allow_internet:
        return f"{ip} port {port}: the workspace's network policy allows no internet access"
    if not allow:
        return None
    for rule in allow:
        net = ipaddress.ip_network(str(rule.get("cidr")), strict=False)
        if ip not in net or rule.get("protocol") == "udp":
            continue
        ports = rule.get("ports") or []
        assert isinstance(ports, list)
        if not ports or any(int(a) <= port <= int(b) for a, b in ports):
            return None
    return f"{ip} port {port} is outside the workspace's egress allow-list"


# --- argv builders -----------------------------------------------------------------------


def base_argv(repo: str | None, *, allow_file: bool = False) -> list[str]:
    """``git [-C repo]`` with only the allowed transports enabled."""
    argv = ["git"] + (["-C", repo] if repo else [])
    argv += ["-c", "protocol.allow=never", "-c", "core.pager=cat", "-c", "color.ui=false",
             "-c", "advice.detachedHead=false"]
    for s in (*NETWORK_SCHEMES, *(("file",) if allow_file else ())):
        argv += ["-c", f"protocol.{s}.allow=always"]
    return argv


def clone_argv(url: GitUrl, path: str, *, branch: str | None, depth: int | None,
               allow_file: bool = False) -> list[str]:
    argv = [*base_argv(None, allow_file=allow_file), "clone", "--quiet", "--no-recurse-submodules"]
    if branch:
        argv += ["--branch", check_ref(branch)]
    if depth:
        argv += ["--depth", str(int(depth))]
    return [*argv, "--", url.url, path]


def status_argv(repo: str) -> list[str]:
    return [*base_argv(repo), "status", "--porcelain=v2", "--branch", "-z"]


def diff_argv(repo: str, *, staged: bool, stat: bool, file_path: str | None) -> list[str]:
    argv = [*base_argv(repo), "diff", "--no-color", "--no-ext-diff", "--no-textconv"]
    if staged:
        argv.append("--cached")
    if stat:
        argv += ["--numstat", "-z"]
    argv.append("--")
    if file_path:
        argv.append(check_file_path(file_path))
    return argv


def commit_argv(repo: str, *, author: str | None) -> list[str]:
    """``git commit`` reading the message from stdin (any text, no option parsing)."""
    argv = [*base_argv(repo), "commit", "--quiet", "--no-verify", "--file=-"]
    if author:
        argv.append(f"--author={check_author(author)}")
    return argv


def push_argv(repo: str, *, remote: str, branch: str | None, force: bool,
              set_upstream: bool, allow_file: bool = False) -> list[str]:
    argv = [*base_argv(repo, allow_file=allow_file), "push", "--porcelain"]
    if force:
        argv.append("--force")
    if set_upstream:
        argv.append("--set-upstream")
    argv += ["--", check_remote(remote)]
    if branch:
        argv.append(check_ref(branch))
    return argv


# --- parsers -----------------------------------------------------------------------------


@dataclass
class Status:
    """``git status --porcelain=v2 --branch -z``, parsed."""

    branch: str | None = None
    commit: str | None = None
    upstream: str | None = None
    ahead: int = 0
    behind: int = 0
    staged: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)
    conflicted: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return bool(self.staged or self.modified or self.untracked or self.conflicted)


def parse_status(out: str) -> Status:
    """Parse porcelain v2 with ``-z``: NUL-separated records; a rename (``2``)
    carries its original path as the next record."""
    st = Status()
    records = out.split("\0")
    i = 0
    while i < len(records):
        rec = records[i]
        i += 1
        if not rec:
            continue
        if rec.startswith("# "):
            key, _, value = rec[2:].partition(" ")
            if key == "branch.oid":
                st.commit = None if value == "(initial)" else value
            elif key == "branch.head":
                st.branch = None if value == "(detached)" else value
            elif key == "branch.upstream":
                st.upstream = value
            elif key == "branch.ab":
                a, _, b = value.partition(" ")
                st.ahead, st.behind = int(a.lstrip("+")), int(b.lstrip("-"))
            continue
        kind = rec[0]
        if kind == "?":
            st.untracked.append(rec[2:])
        elif kind == "u":
            st.conflicted.append(rec.split(" ", 10)[10])
        elif kind in "12":
            fields = rec.split(" ", 8 if kind == "1" else 9)
            xy, path = fields[1], fields[-1]
            if kind == "2":
                orig = records[i] if i < len(records) else ""
                i += 1
                st.renamed.append((orig, path))
            if xy[0] != ".":
                st.staged.append(path)
            if xy[1] != ".":
                st.modified.append(path)
    return st


@dataclass(frozen=True)
class FileStat:
    path: str
    added: int | None  # None: binary
    deleted: int | None


def parse_numstat(out: str) -> list[FileStat]:
    """Parse ``git diff --numstat -z``: ``added<TAB>deleted<TAB>path\\0``, or for a
    rename ``added<TAB>deleted<TAB>\\0old\\0new\\0``; ``-`` counts mean binary."""
    stats = []
    records = out.split("\0")
    i = 0
    while i < len(records):
        rec = records[i]
        i += 1
        if not rec:
            continue
        added, deleted, path = rec.split("\t", 2)
        if path == "":
            i += 1  # the old name
            path = records[i] if i < len(records) else ""
            i += 1
        stats.append(FileStat(path, None if added == "-" else int(added),
                              None if deleted == "-" else int(deleted)))
    return stats


def parse_unmerged(out: str) -> list[str]:
    """``git diff --name-only --diff-filter=U -z``: the conflicting files, sorted."""
    return sorted({p for p in out.split("\0") if p})
