"""``agentiso doctor``: can I use agentiso, and if not, why and what to do.

:func:`judge` is pure: it turns :class:`UserFacts` (plain values gathered
beforehand) into one :class:`Check` per step a user needs, in the order they
depend on each other: the config parses, the state directory is writable, the
helper's socket exists, I may connect to it, the helper answers, and the
images I would use are installed.  A step whose prerequisite failed is
``skip`` (saying which), so the first fail is the one to fix.

:func:`gather` is the thin adapter: it reads the config, stats paths, asks
the group database, connects to the helper and asks it who I am and which
images it has.  It changes nothing (it never creates the state directory).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from agentiso.protocol.errors import PermissionDenied, RemoteError, WireError

from .config import (
    DEFAULT_HELPER_SOCKET,
    FrontendConfig,
    default_config_path,
    load_config,
    parse_config,
)
from .errors import FrontendError
from .helper_client import connect_helper

Status = Literal["pass", "warn", "fail", "skip"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Check:
    """One step's verdict; ``fix`` is set for every fail and warn."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class UserFacts:
    uid: int
    user: str
    #: The groups this process has (a membership added since login is not here).
    groups: tuple[int, ...]
    config_source: str | None = None
    #: The config's error (cause, then what to do); None: it parsed.
    config_error: str | None = None
    state_dir: str = ""
    #: Why the state directory is not usable (None: it is, or can be made).
    state_problem: str | None = None
    socket_path: str = DEFAULT_HELPER_SOCKET
    #: (mode bits, owner uid, group gid, is a socket); None: no such file.
    socket_stat: tuple[int, int, int, bool] | None = None
    #: Why the socket's directory cannot be entered (None: it can).
    socket_dir_problem: str | None = None
    #: Name of the socket's group, and whether the group database lists me in it.
    socket_group: str = ""
    listed_in_group: bool = False
    #: None: connected and greeted.  Else the error.
    connect_error: str | None = None
    #: The helper itself refused me (permission_denied): not its group, or polkit said no.
    connect_denied: bool = False
    #: Who the helper says I am: (uid, gid, admin).
    identity: tuple[int, int, bool] | None = None
    helper_server: str = ""
    #: Images the helper has (None: could not ask).
    images: tuple[str, ...] | None = None
    images_error: str = ""
    default_image: str = "minimal"


def judge(f: UserFacts) -> list[Check]:
    out: list[Check] = []
    if f.config_error is not None:
        cause, _, fix = f.config_error.partition("\n")
        out.append(Check("config", "fail", cause, fix or "fix the file, or remove it"))
    else:
        out.append(Check("config", "pass", f.config_source or "no config file: defaults"))
    if f.state_problem is not None:
        out.append(Check("state-dir", "fail", f.state_problem,
                         f"make {f.state_dir} yours and writable (or set state_dir in "
                         "config.toml)"))
    else:
        out.append(Check("state-dir", "pass", f"{f.state_dir} is writable by you"))
    out.append(_socket(f))
    out.append(_permission(f, out[-1]))
    out.append(_helper(f, out[-1]))
    out.append(_images(f, out[-1]))
    return out


def _socket(f: UserFacts) -> Check:
    p = f.socket_path
    if f.socket_stat is None:
        if f.socket_dir_problem is not None:
            return Check("socket", "fail", f.socket_dir_problem,
                         "ask your administrator to make the socket's directory "
                         "traversable (a+x)")
        return Check("socket", "fail",
                     f"{p} does not exist: the helper is not installed or not listening",
                     "ask your administrator: systemctl enable --now agentiso-helper.socket "
                     "(agentiso-helper check says what is missing); or set helper_socket "
                     "in config.toml")
    mode, _uid, _gid, is_sock = f.socket_stat
    if not is_sock:
        return Check("socket", "fail", f"{p} is not a socket",
                     "point helper_socket in config.toml at the helper's socket")
    if f.socket_dir_problem is not None:
        return Check("socket", "fail", f.socket_dir_problem,
                     "ask your administrator to make the socket's directory traversable (a+x)")
    return Check("socket", "pass", f"{p} (mode {mode:04o}, group {f.socket_group})")


def _may_connect(f: UserFacts) -> bool:
    """Connecting to a Unix socket needs write permission on it."""
    assert f.socket_stat is not None
    mode, owner, gid, _ = f.socket_stat
    if f.uid == 0:
        return True
    if owner == f.uid:
        return bool(mode & stat.S_IWUSR)
    if gid in f.groups:
        return bool(mode & stat.S_IWGRP)
    return bool(mode & stat.S_IWOTH)


def _permission(f: UserFacts, socket: Check) -> Check:
    if socket.status != "pass":
        return Check("permission", "skip", "no socket to check")
    assert f.socket_stat is not None
    mode, _owner, gid, _ = f.socket_stat
    if _may_connect(f):
        how = "root" if f.uid == 0 else (
            f"member of {f.socket_group}" if gid in f.groups else f"socket mode {mode:04o}")
        return Check("permission", "pass", f"you ({f.user}) may connect: {how}")
    group = f.socket_group
    if f.listed_in_group:
        return Check("permission", "fail",
                     f"you ({f.user}) were added to group {group}, but this login "
                     "does not have it yet",
                     f"log out and in again (or run: newgrp {group})")
    return Check("permission", "fail",
                 f"you ({f.user}) are not in group {group}, which owns {f.socket_path} "
                 f"(mode {mode:04o})",
                 f"ask your administrator: usermod -aG {group} {f.user}; then log in again")


def _helper(f: UserFacts, permission: Check) -> Check:
    if permission.status not in ("pass",):
        return Check("helper", "skip", "cannot connect (see above)")
    if f.connect_error is not None and f.connect_denied:
        return Check("helper", "fail", f"the helper refused you: {f.connect_error}",
                     f"ask your administrator to add you to the helper's group "
                     f"(usermod -aG {f.socket_group or 'agentiso'} {f.user}) or, with polkit, "
                     "to grant you the agentiso actions; then log in again")
    if f.connect_error is not None:
        return Check("helper", "fail", f.connect_error,
                     "ask your administrator to run agentiso-helper check and read "
                     "the helper's log (journalctl -u agentiso-helper)")
    assert f.identity is not None
    uid, gid, admin = f.identity
    return Check("helper", "pass", f"{f.helper_server} answers; it sees you as uid {uid} "
                 f"gid {gid}{' (admin)' if admin else ''}")


def _images(f: UserFacts, helper: Check) -> Check:
    if helper.status != "pass":
        return Check("images", "skip", "no helper to ask")
    if f.images is None:
        return Check("images", "fail", f"the helper did not list its images: {f.images_error}",
                     "ask your administrator to run agentiso-helper check")
    if not f.images:
        return Check("images", "fail", "the helper has no images installed",
                     "ask your administrator to build and install one (make image)")
    if f.default_image not in f.images:
        return Check("images", "fail",
                     f"your default image {f.default_image!r} is not installed "
                     f"(installed: {', '.join(f.images)})",
                     f"set [defaults] image in config.toml to one of: {', '.join(f.images)}")
    return Check("images", "pass", f"{', '.join(f.images)} (default {f.default_image})")


def render(checks: list[Check]) -> str:
    out = []
    for c in checks:
        out.append(f"{c.status.upper():<4}  {c.name:<11} {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            out.append(f"{'':<17} fix: {c.fix}")
    fails = [c.name for c in checks if c.status == "fail"]
    out.append("you can use agentiso" if not fails else
               f"not usable yet: fix {fails[0]} first")
    return "\n".join(out)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


# --- gathering (read-only I/O) ---------------------------------------------------------


def state_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as my state dir (None: it is, or its nearest
    existing ancestor lets me create it)."""
    p = path
    while not p.exists():
        if p.parent == p:
            return f"no existing ancestor of {path}"
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        what = "it" if p == path else f"its ancestor {p}"
        return f"{path}: {what} is not writable by you"
    return None


def socket_facts(path: str) -> tuple[tuple[int, int, int, bool] | None, str | None, str]:
    """(mode, owner, gid, is-socket) or None, a directory problem, the group's name."""
    for parent in reversed(Path(path).parents):
        if not os.access(parent, os.X_OK):
            return None, f"cannot enter {parent} (no search permission)", ""
    try:
        st = os.stat(path)
    except OSError:
        return None, None, ""
    try:
        name = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        name = str(st.st_gid)
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, stat.S_ISSOCK(st.st_mode)), None, name


def listed_in(group: str, user: str) -> bool:
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    try:
        primary = pwd.getpwnam(user).pw_gid == g.gr_gid
    except KeyError:
        primary = False
    return primary or user in g.gr_mem


def raw_helper_socket(path: Path | None) -> str | None:
    """``helper_socket`` of a config file that did not validate, if readable."""
    try:
        raw = tomllib.loads((path or default_config_path()).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    value = raw.get("helper_socket")
    return value if isinstance(value, str) else None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


async def gather(config_path: Path | None, helper_socket: str | None,
                 timeout: float = 10.0) -> UserFacts:
    """Everything :func:`judge` needs, looked at as the calling user."""
    uid = os.getuid()
    user = user_name(uid)
    groups = tuple(sorted({os.getgid(), *os.getgroups()}))
    config_error = None
    try:
        cfg: FrontendConfig = load_config(config_path, helper_socket=helper_socket)
    except FrontendError as exc:
        config_error = str(exc)
        cfg = parse_config("", source="<defaults>", cwd=Path.cwd())
        # Check the rest against the socket the file names, if it names one.
        named = helper_socket or raw_helper_socket(config_path)
        if named is not None:
            cfg = _replace(cfg, helper_socket=named)
    sock, dir_problem, group = socket_facts(cfg.helper_socket)
    facts = UserFacts(
        uid=uid, user=user, groups=groups, config_source=cfg.source,
        config_error=config_error, state_dir=str(cfg.state_dir),
        state_problem=state_problem(cfg.state_dir), socket_path=cfg.helper_socket,
        socket_stat=sock, socket_dir_problem=dir_problem, socket_group=group,
        listed_in_group=bool(group) and listed_in(group, user),
        default_image=cfg.defaults.image,
    )
    if sock is None or not sock[3]:
        return facts
    try:
        async with connect_helper(cfg.helper_socket, timeout=timeout,
                                  client_name="agentiso doctor") as h:
            who = await h.whoami(timeout=timeout)
            server = h.hello.server if h.hello is not None else "agentiso-helper"
            try:
                imgs: tuple[str, ...] | None = tuple(
                    i.name for i in (await h.image_list(timeout=timeout)).images)
                img_err = ""
            except (RemoteError, FrontendError) as exc:
                imgs, img_err = None, str(exc)
    except PermissionDenied as exc:
        return _replace(facts, connect_error=str(exc), connect_denied=True)
    except (FrontendError, WireError) as exc:
        return _replace(facts, connect_error=str(exc))
    return _replace(facts, identity=(who.uid, who.gid, who.admin), helper_server=server,
                    images=imgs, images_error=img_err)


def _replace(f: _T, **changes: object) -> _T:
    if isinstance(f, FrontendConfig):
        return msgspec.structs.replace(f, **changes)
    return dataclasses.replace(f, **changes)  # type: ignore[type-var]
