"""Host paths under the configured roots: every rule, and attempts to break it.

Most tests run twice: with openat2 (where the kernel has it) and with the
component walk used where it has not (forced by ``openat2_available = False``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.frontend import openat
from agentiso.frontend.errors import FrontendError
from agentiso.frontend.hostpaths import (
    HostPathError,
    HostPathExists,
    HostPathNotFound,
    HostPermissionDenied,
    HostRoots,
    InvalidHostPath,
    InvalidHostRoot,
    NotARegularFile,
    PathOutsideRoots,
)

HAVE_OPENAT2 = openat._probe_openat2()


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2":
        if not HAVE_OPENAT2:
            pytest.skip("this kernel (or its seccomp filter) has no openat2")
        monkeypatch.setattr(openat, "openat2_available", True)
    else:
        monkeypatch.setattr(openat, "openat2_available", False)
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """base/root (the root) and base/outside, with links of every kind."""
    root = tmp_path / "root"
    out = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    out.mkdir()
    (root / "f.txt").write_bytes(b"inside")
    (root / "sub" / "g.txt").write_bytes(b"inside-g")
    (out / "secret.txt").write_bytes(b"SECRET")
    (out / "g.txt").write_bytes(b"SECRET-g")
    links = {
        "link_in": "sub/g.txt",
        "link_in_dir": "sub",
        "link_in_updown": "sub/../f.txt",
        "link_abs_in": str(root / "f.txt"),
        "link_out": "../outside/secret.txt",
        "link_out_abs": str(out / "secret.txt"),
        "link_out_dir": "../outside",
        "link_out_dir_abs": str(out),
        "link_dangling_out": "../outside/new.txt",
        "link_loop": "link_loop",
        "link_proc": "/proc/self/root/etc/hostname",
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    (root / "sub" / "link_up").symlink_to("../f.txt")
    os.mkfifo(root / "fifo")
    return tmp_path


def roots_of(tree: Path) -> HostRoots:
    return HostRoots([tree / "root"])


def read(roots: HostRoots, path: str) -> bytes:
    f, size = roots.open_read(path)
    with f:
        data = f.read()
    assert len(data) == size
    return data


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- roots -------------------------------------------------------------------------------


def test_roots_must_be_absolute_existing_directories(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for bad, what in [
        ("relative/dir", "not an absolute path"),
        ("~/projects", "not an absolute path"),
        ("", "not an absolute path"),
        (str(tmp_path / "missing"), "cannot be used: No such file or directory"),
        (str(tmp_path / "file"), "is not a directory"),
    ]:
        with pytest.raises(InvalidHostRoot, match=what) as info:
            HostRoots([bad], config_file="/home/u/.config/agentiso/config.toml")
        assert "host_roots in /home/u/.config/agentiso/config.toml" in str(info.value)
        assert isinstance(info.value, FrontendError)


def test_no_roots_refuses_everything(tmp_path: Path) -> None:
    roots = HostRoots([])
    with pytest.raises(PathOutsideRoots, match="no host roots are configured"):
        roots.resolve("f.txt")


# --- lexical rules ----------------------------------------------------------------------


def test_resolve_relative_and_absolute(tree: Path) -> None:
    other = tree / "other"
    other.mkdir()
    roots = HostRoots([tree / "root", other])
    hp = roots.resolve("sub/g.txt")
    assert (str(hp.root.configured), hp.parts) == (str(tree / "root"), ("sub", "g.txt"))
    assert hp.path == str(tree / "root" / "sub" / "g.txt")
    assert roots.resolve(f"{other}/x/y").parts == ("x", "y")
    assert str(roots.resolve(f"{other}/x/y").root.configured) == str(other)
    assert roots.resolve("./sub//g.txt/.").parts == ("sub", "g.txt")
    assert roots.resolve(str(tree / "root")).parts == ()


@pytest.mark.parametrize(
    "path",
    ["..", "../outside/secret.txt", "sub/../../outside/secret.txt", "sub/../f.txt",
     "{root}/../outside/secret.txt", "{root}/sub/..", "a/b/../../.."],
)  # fmt: skip
def test_dotdot_is_refused_outright(tree: Path, path: str) -> None:
    roots = roots_of(tree)
    with pytest.raises(PathOutsideRoots, match=r"contains '\.\.'") as info:
        roots.resolve(path.format(root=tree / "root"))
    assert "host_roots in your agentiso config.toml" in str(info.value)
    assert str(tree / "root") in str(info.value)  # the message names the roots


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "{base}", "{base}/outside/secret.txt",
                                  "{base}/rootx/f.txt", "{base}/roo"])  # fmt: skip
def test_absolute_outside_is_refused(tree: Path, path: str) -> None:
    with pytest.raises(PathOutsideRoots, match="is outside the host roots"):
        roots_of(tree).resolve(path.format(base=tree))


def test_malformed_paths(tree: Path) -> None:
    roots = roots_of(tree)
    for bad, what in [("", "empty"), ("f.txt\0", "NUL"), ("a" * 5000, "longer than")]:
        with pytest.raises(InvalidHostPath, match=what):
            roots.resolve(bad)
        with pytest.raises(InvalidHostPath):
            roots.open_read(bad)
        with pytest.raises(InvalidHostPath):
            roots.writer(bad)
    with pytest.raises(InvalidHostPath, match="too long"):
        roots.open_read("x" * 300)


# --- reading ---------------------------------------------------------------------------


def test_read_regular_files(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    assert read(roots, "f.txt") == b"inside"
    assert read(roots, str(tree / "root" / "sub" / "g.txt")) == b"inside-g"
    f, size = roots.open_read("f.txt")
    with f:
        assert size == 6 and os.get_blocking(f.fileno())
        assert os.get_inheritable(f.fileno()) is False


@pytest.mark.parametrize(
    "path",
    ["link_out", "link_out_abs", "link_out_dir/secret.txt", "link_out_dir_abs/secret.txt",
     "link_abs_in", "link_proc", "link_loop"],
)  # fmt: skip
def test_links_that_escape_are_refused(tree: Path, mode: str, path: str) -> None:
    with pytest.raises(PathOutsideRoots, match="symbolic link"):
        read(roots_of(tree), path)


@pytest.mark.parametrize(
    ("path", "content"),
    [("link_in", b"inside-g"), ("link_in_dir/g.txt", b"inside-g"),
     ("link_in_updown", b"inside"), ("sub/link_up", b"inside")],
)  # fmt: skip
def test_links_that_stay_inside(tree: Path, mode: str, path: str, content: bytes) -> None:
    roots = roots_of(tree)
    if mode == "openat2":
        assert read(roots, path) == content
    else:
        with pytest.raises(PathOutsideRoots, match="symbolic link"):
            read(roots, path)


def test_fifo_is_refused_without_blocking(tree: Path, mode: str) -> None:
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            roots_of(tree).open_read("fifo")
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "open_read blocked on a FIFO"
    assert isinstance(result[0], NotARegularFile)


def test_directories_sockets_missing(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    with pytest.raises(NotARegularFile, match="is a directory"):
        roots.open_read("sub")
    with pytest.raises(NotARegularFile):
        roots.open_read(str(tree / "root"))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tree / "root" / "sock"))
        with pytest.raises(NotARegularFile):
            roots.open_read("sock")
    finally:
        sock.close()
    with pytest.raises(HostPathNotFound, match="does not exist"):
        roots.open_read("nope.txt")
    with pytest.raises(HostPathNotFound, match="not a directory"):
        roots.open_read("f.txt/x")


def test_dangling_link(tree: Path, mode: str) -> None:
    (tree / "root" / "dangling_in").symlink_to("sub/missing")
    err = HostPathNotFound if mode == "openat2" else PathOutsideRoots
    with pytest.raises(err):
        roots_of(tree).open_read("dangling_in")


# --- writing -----------------------------------------------------------------------------


@pytest.fixture
def umask027() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_write_new_file(tree: Path, mode: str, umask027: None) -> None:
    roots = roots_of(tree)
    before = listing(tree / "root")
    with roots.writer("new.bin") as w:
        assert w.write(b"abc") == 3
        assert w.write(memoryview(b"defg")) == 4
        assert not (tree / "root" / "new.bin").exists()  # nothing visible until commit
    assert w.committed and w.bytes_written == 7
    p = tree / "root" / "new.bin"
    assert p.read_bytes() == b"abcdefg"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a normal new file under the umask
    assert listing(tree / "root") == sorted([*before, "new.bin"])  # no temp left behind


def test_overwrite_refused_and_allowed(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    p = tree / "root" / "f.txt"
    p.chmod(0o751)
    with pytest.raises(HostPathExists, match="already exists"):
        roots.writer("f.txt")
    assert p.read_bytes() == b"inside"
    with roots.writer("f.txt", overwrite=True) as w:
        w.write(b"replaced")
    assert p.read_bytes() == b"replaced"
    assert stat.S_IMODE(p.stat().st_mode) == 0o751  # the file's permissions are kept


@pytest.mark.parametrize("target", ["link_in", "link_out", "link_dangling_out", "sub", "fifo"])
def test_overwrite_never_writes_through_links_or_special_files(
    tree: Path, mode: str, target: str
) -> None:
    roots = roots_of(tree)
    before = listing(tree / "root")
    with pytest.raises(HostPathExists):
        roots.writer(target)
    with pytest.raises(NotARegularFile):
        roots.writer(target, overwrite=True)
    assert listing(tree / "root") == before
    assert listing(tree / "outside") == ["g.txt", "secret.txt"]
    assert (tree / "outside" / "secret.txt").read_bytes() == b"SECRET"


def test_failed_write_leaves_nothing(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    before = listing(tree / "root")
    with pytest.raises(RuntimeError), roots.writer("half.bin") as w:
        w.write(b"x" * 100_000)
        raise RuntimeError("transfer broke")
    assert listing(tree / "root") == before
    w = roots.writer("half.bin")
    w.write(b"partial")
    w.abort()
    w.abort()  # idempotent
    assert listing(tree / "root") == before
    with pytest.raises(ValueError):
        w.write(b"more")
    # A failure while overwriting leaves the old file as it was.
    with pytest.raises(RuntimeError), roots.writer("f.txt", overwrite=True) as w:
        w.write(b"new")
        raise RuntimeError
    assert (tree / "root" / "f.txt").read_bytes() == b"inside"


def test_a_file_created_meanwhile_is_not_clobbered(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    w = roots.writer("race.txt")
    w.write(b"mine")
    (tree / "root" / "race.txt").write_bytes(b"theirs")
    with pytest.raises(HostPathExists):
        w.commit()
    assert (tree / "root" / "race.txt").read_bytes() == b"theirs"
    assert not [n for n in listing(tree / "root") if n.startswith(".agentiso-")]


def test_no_replace_without_renameat2(
    tree: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where renameat2 is missing, link() + unlink() keeps the no-clobber rule."""
    monkeypatch.setattr(openat, "_renameat2", None)
    roots = roots_of(tree)
    with roots.writer("linked.txt") as w:
        w.write(b"one")
    assert (tree / "root" / "linked.txt").read_bytes() == b"one"
    w = roots.writer("race2.txt")
    w.write(b"mine")
    (tree / "root" / "race2.txt").write_bytes(b"theirs")
    with pytest.raises(HostPathExists):
        w.commit()
    assert (tree / "root" / "race2.txt").read_bytes() == b"theirs"
    assert not [n for n in listing(tree / "root") if n.startswith(".agentiso-")]


def test_target_replaced_by_a_link_before_an_overwrite_commits(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    w = roots.writer("f.txt", overwrite=True)
    w.write(b"mine")
    (tree / "root" / "f.txt").unlink()
    (tree / "root" / "f.txt").symlink_to("../outside/secret.txt")
    with pytest.raises(NotARegularFile):
        w.commit()
    assert (tree / "outside" / "secret.txt").read_bytes() == b"SECRET"
    assert (tree / "root" / "f.txt").is_symlink()


def test_parents(tree: Path, mode: str, umask027: None) -> None:
    roots = roots_of(tree)
    with pytest.raises(HostPathNotFound, match="does not exist"):
        roots.writer("a/b/c.txt")
    assert not (tree / "root" / "a").exists()
    with roots.writer("a/b/c.txt", parents=True) as w:
        w.write(b"deep")
    assert (tree / "root" / "a" / "b" / "c.txt").read_bytes() == b"deep"
    assert stat.S_IMODE((tree / "root" / "a").stat().st_mode) == 0o750
    # Existing directories on the way are fine; a file on the way is not.
    with roots.writer("a/d.txt", parents=True) as w:
        w.write(b"")
    with pytest.raises(HostPathNotFound, match="not a directory"):
        roots.writer("f.txt/x.txt", parents=True)


@pytest.mark.parametrize("via", ["link_out_dir", "link_out_dir_abs"])
def test_writes_through_escaping_directory_links_are_refused(
    tree: Path, mode: str, via: str
) -> None:
    roots = roots_of(tree)
    for parents in (False, True):
        with pytest.raises(PathOutsideRoots):
            roots.writer(f"{via}/new.txt", parents=parents)
        with pytest.raises(PathOutsideRoots):
            roots.writer(f"{via}/x/y/new.txt", parents=parents)
    assert listing(tree / "outside") == ["g.txt", "secret.txt"]


def test_write_through_a_link_that_stays_inside(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    if mode == "openat2":
        with roots.writer("link_in_dir/new.txt") as w:
            w.write(b"ok")
        assert (tree / "root" / "sub" / "new.txt").read_bytes() == b"ok"
    else:
        with pytest.raises(PathOutsideRoots):
            roots.writer("link_in_dir/new.txt")


def test_the_root_itself_is_not_a_file(tree: Path, mode: str) -> None:
    with pytest.raises(NotARegularFile):
        roots_of(tree).writer(str(tree / "root"))
    with pytest.raises(NotARegularFile):
        roots_of(tree).writer(f"{tree}/root/")


def test_a_trailing_slash_names_a_directory(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    for path in ("newdir/", "f.txt/", "sub/.", "sub/"):
        with pytest.raises(NotARegularFile, match="ends with '/'"):
            roots.writer(path, parents=True)
        with pytest.raises(NotARegularFile, match="ends with '/'"):
            roots.open_read(path)
    assert not (tree / "root" / "newdir").exists()


def test_a_dropped_writer_cleans_up(tree: Path, mode: str) -> None:
    roots = roots_of(tree)
    before = listing(tree / "root")
    w = roots.writer("dropped.txt")
    w.write(b"x")
    del w
    assert listing(tree / "root") == before


# --- races -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inside", "outside", "path"),
    [("sub", "../outside", "swap/g.txt"), ("sub/g.txt", "../outside/g.txt", "swap")],
    ids=["directory", "file"],
)
def test_symlink_swap_race_cannot_escape(
    tree: Path, mode: str, inside: str, outside: str, path: str
) -> None:
    """A link flipped between an inside and an outside target as fast as
    possible, while the same path is read (and, through a directory link,
    written): nothing outside is ever read or created, because the lookup and
    the open are one kernel operation."""
    root = tree / "root"
    (root / "swap").symlink_to(inside)
    stop = threading.Event()

    def flip() -> None:
        tmp = root / "swap.tmp"
        while not stop.is_set():
            for target in (outside, inside):
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                os.rename(tmp, root / "swap")  # atomic: "swap" always exists

    t = threading.Thread(target=flip, daemon=True)
    t.start()
    roots = roots_of(tree)
    outcomes: dict[str, int] = {}
    try:
        for i in range(400):
            try:
                data = read(roots, path)
                assert data == b"inside-g"
                outcomes["read"] = outcomes.get("read", 0) + 1
            except PathOutsideRoots:
                outcomes["refused"] = outcomes.get("refused", 0) + 1
            if path != "swap":
                try:
                    with roots.writer(f"swap/w{i}.txt") as w:
                        w.write(b"x")
                except PathOutsideRoots:
                    pass
    finally:
        stop.set()
        t.join(5)
    assert listing(tree / "outside") == ["g.txt", "secret.txt"]
    if mode == "walk":
        assert "read" not in outcomes  # every link refused
    assert sum(outcomes.values()) == 400, outcomes


# --- a root that is itself a symlink ---------------------------------------------------


def test_root_that_is_a_symlink_is_resolved_once(tree: Path, mode: str) -> None:
    link = tree / "root_link"
    link.symlink_to("root")
    roots = HostRoots([link])
    assert str(roots.roots[0].real) == str(tree / "root")
    assert read(roots, "f.txt") == b"inside"
    assert read(roots, f"{link}/f.txt") == b"inside"  # the configured spelling
    assert read(roots, f"{tree}/root/f.txt") == b"inside"  # the resolved one
    # Re-pointing the link later does not move the root.
    link.unlink()
    link.symlink_to("outside")
    with pytest.raises(HostPathNotFound):
        read(roots, "secret.txt")
    assert read(roots, "f.txt") == b"inside"


def test_a_root_that_vanishes(tree: Path, mode: str) -> None:
    gone = tree / "gone"
    gone.mkdir()
    roots = HostRoots([gone])
    gone.rmdir()
    with pytest.raises(HostPathNotFound, match="its host root"):
        roots.open_read("x")


# --- permissions (an unprivileged uid) -------------------------------------------------

PERM_SCENARIO = textwrap.dedent(
    """
    import json, sys
    from agentiso.frontend import openat
    from agentiso.frontend.hostpaths import HostRoots, HostPathError

    openat.openat2_available = {openat2}
    roots = HostRoots([sys.argv[1]])
    out = {{}}
    for name, call in [
        ("read_private", lambda: roots.open_read("private.txt")),
        ("read_in_closed_dir", lambda: roots.open_read("closed/x.txt")),
        ("write_in_readonly_dir", lambda: roots.writer("new.txt")),
        ("write_parents_in_closed_dir", lambda: roots.writer("closed/a/new.txt", parents=True)),
        ("overwrite_readonly_dir", lambda: roots.writer("public.txt", overwrite=True)),
    ]:
        try:
            call()
            out[name] = "ok"
        except HostPathError as exc:
            out[name] = type(exc).__name__
    print(json.dumps(out))
    """
)


def test_permission_denied_surfaces_as_host_permission_denied(mode: str) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged uid")
    from tests.support.helper_process import public_runtime

    base = Path(tempfile.mkdtemp(prefix="agentiso-hostpaths-"))
    try:
        base.chmod(0o755)
        root = base / "root"
        (root / "closed").mkdir(parents=True)
        (root / "private.txt").write_text("no")
        (root / "private.txt").chmod(0o000)
        (root / "public.txt").write_text("yes")
        (root / "public.txt").chmod(0o644)
        (root / "closed" / "x.txt").write_text("no")
        (root / "closed").chmod(0o000)
        root.chmod(0o555)
        code = PERM_SCENARIO.format(openat2=mode == "openat2")
        python = getattr(sys, "_base_executable", sys.executable)
        argv = [python, "-c", code, str(root)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        # The code, from a copy any uid can read (the checkout may be private).
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(public_runtime())}
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {
            "read_private": "HostPermissionDenied",
            "read_in_closed_dir": "HostPermissionDenied",
            "write_in_readonly_dir": "HostPermissionDenied",
            "write_parents_in_closed_dir": "HostPermissionDenied",
            "overwrite_readonly_dir": "HostPermissionDenied",
        }
        assert sorted(os.listdir(root)) == ["closed", "private.txt", "public.txt"]
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base)


def test_every_error_is_a_frontend_error_with_two_lines(tree: Path) -> None:
    roots = roots_of(tree)
    for call in (
        lambda: roots.resolve("../x"),
        lambda: roots.open_read("nope"),
        lambda: roots.writer("f.txt"),
        lambda: roots.open_read("sub"),
    ):
        with pytest.raises(HostPathError) as info:
            call()
        cause, hint = str(info.value).split("\n")
        assert isinstance(info.value, FrontendError)
        assert (cause, hint) == (info.value.cause, info.value.hint)
        assert hint[0].isupper() and hint.endswith(".")


def test_openat2_is_probed_once(monkeypatch: pytest.MonkeyPatch, tree: Path) -> None:
    monkeypatch.setattr(openat, "openat2_available", None)
    assert read(roots_of(tree), "f.txt") == b"inside"
    assert openat.openat2_available is HAVE_OPENAT2


def test_permission_error_class_is_exported() -> None:
    assert issubclass(HostPermissionDenied, HostPathError)
