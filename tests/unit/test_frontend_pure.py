"""The frontend's pure parts: config, output decoding, line windows, edits,
modes, tool error texts, session liveness, kept-open connections, tool schemas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from agentiso.frontend import cli, guestfiles
from agentiso.frontend.config import ConfigError, default_config_path, load_config, parse_config
from agentiso.frontend.errors import ConnectionLost, HelperUnavailable, Hop
from agentiso.frontend.execution import decode_output, plain_argv
from agentiso.frontend.keepopen import KeptOpen
from agentiso.frontend.sessions import Session, session_alive
from agentiso.frontend.toolerrors import describe
from agentiso.protocol import errors as pe

# --- config --------------------------------------------------------------------------------------


def test_config_defaults_and_roots() -> None:
    cfg = parse_config("", cwd=Path("/home/u/proj"), home=Path("/home/u"))
    assert cfg.helper_socket == "/run/agentiso/helper.sock"
    assert cfg.host_roots == (Path("/home/u/proj"),)
    assert cfg.defaults.image == "minimal" and cfg.defaults.memory_mb == 256
    assert parse_config("", cwd=Path("/")).host_roots == (), "never share / by default"
    cfg = parse_config('host_roots = ["~/a", "/b"]\nstate_dir = "~/s"\n[defaults]\nvcpus = 2\n',
                       home=Path("/home/u"))
    assert cfg.host_roots == (Path("/home/u/a"), Path("/b"))
    assert cfg.state_dir == Path("/home/u/s") and cfg.defaults.vcpus == 2


@pytest.mark.parametrize("text", [
    "nonsense = 1\n",                        # unknown key
    "host_roots = ['relative/dir']\n",       # not absolute
    "[defaults]\nvcpus = 0\n",               # out of range
    "[defaults]\nimage = 'Bad Name'\n",      # not an image name
    "[limits]\nmax_exec_timeout_secs = 0\n",
    "helper_socket = \n",                    # not TOML
])
def test_config_refuses_bad_files(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="c.toml")
    assert str(e.value).startswith("c.toml") and "\n" in str(e.value)


def test_helper_socket_option_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'helper_socket = "/from/file.sock"\nstate_dir = "{tmp_path}"\n')
    assert load_config(path).helper_socket == "/from/file.sock"
    assert load_config(path, helper_socket="/x.sock").helper_socket == "/x.sock"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")  # named, so it must be there


def test_default_config_is_in_the_platform_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_config_path() == tmp_path / "xdg" / "agentiso" / "config.toml"
    cfg = load_config()  # no file yet: all defaults, from no file
    assert cfg.source is None and cfg.helper_socket == "/run/agentiso/helper.sock"
    assert cfg.state_dir == tmp_path / "state" / "agentiso"
    default_config_path().parent.mkdir(parents=True)
    default_config_path().write_text('helper_socket = "/mine.sock"\n')
    cfg = load_config()
    assert cfg.helper_socket == "/mine.sock" and cfg.source == str(default_config_path())
    assert load_config(helper_socket="/x.sock").helper_socket == "/x.sock"


@pytest.mark.parametrize("argv", [
    ["--helper-socket", "/x.sock", "--config", "/c.toml", "serve"],
    ["serve", "--helper-socket", "/x.sock", "--config", "/c.toml"],
    ["--config", "/c.toml", "status", "--helper-socket", "/x.sock"],
])
def test_cli_takes_the_overrides_before_or_after_the_command(argv: list[str]) -> None:
    args = cli._parser().parse_args(argv)
    assert (args.helper_socket, args.config) == ("/x.sock", Path("/c.toml"))


def test_cli_uses_the_helper_socket_option(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'helper_socket = "{tmp_path}/from-file.sock"\n'
                    f'state_dir = "{tmp_path / "state"}"\n')
    override = tmp_path / "override.sock"
    assert cli.main(["--config", str(path), "status", "--helper-socket", str(override)]) == 1
    out = capsys.readouterr().out
    assert "NOT reachable" in out and str(override) in out and "from-file" not in out


# --- exec output ---------------------------------------------------------------------------------


def test_decode_output() -> None:
    assert decode_output(b"hi\n") == ("hi\n", "utf-8")
    assert decode_output(b"\xff\x00\x01") == ("/wAB", "base64")
    cut = "é".encode() * 3
    assert decode_output(cut[:-1], truncated=True) == ("éé", "utf-8")
    assert decode_output(cut[:-1], truncated=False)[1] == "base64"


@pytest.mark.parametrize(("command", "argv"), [
    ("true", ["true"]),
    ("git  status", ["git", "status"]),
    ("python3 -m pytest -q tests/x.py", ["python3", "-m", "pytest", "-q", "tests/x.py"]),
    ("ls -la /root", ["ls", "-la", "/root"]),
    ("echo hi", None),            # dash's echo interprets escapes; /bin/echo does not
    ("cd /tmp", None),
    ("FOO=1 env", None),
    ("ls *.py", None),
    ("cat a > b", None),
    ("a && b", None),
    ("echo $HOME", None),
    ("ls 'a b'", None),
    ("ls ~", None),
    ("ls # comment", None),
    ("a\nb", None),
    ("", None),
    ("exit 3", None),
])
def test_plain_argv(command: str, argv: list[str] | None) -> None:
    assert plain_argv(command) == argv


# --- files ---------------------------------------------------------------------------------------


def _window(data: bytes, offset: int, limit: int, max_bytes: int = 1 << 20,
            piece: int = 3) -> guestfiles.LineWindow:
    w = guestfiles.LineWindow(offset, limit, max_bytes)
    for i in range(0, len(data), piece):
        if not w.feed(data[i : i + piece]):
            break
    return w


@pytest.mark.parametrize("piece", [1, 2, 5, 100])
def test_line_window(piece: int) -> None:
    data = b"l0\nl1\nl2\nl3\nl4"
    w = _window(data, 1, 2, piece=piece)
    assert (bytes(w.kept), w.count, w.full) == (b"l1\nl2\n", 2, True)
    w = _window(data, 3, 10, piece=piece)
    assert (bytes(w.kept), w.count, w.full) == (b"l3\nl4", 2, False)
    w = _window(data, 9, 1, piece=piece)
    assert (bytes(w.kept), w.count) == (b"", 0)


def test_line_window_byte_budget() -> None:
    w = _window(b"aaaa\nbbbb\ncccc\n", 0, 100, max_bytes=11)
    assert (bytes(w.kept), w.count, w.full) == (b"aaaa\nbbbb\n", 2, True)
    w = _window(b"x" * 50 + b"\nnext\n", 0, 100, max_bytes=10)
    assert (bytes(w.kept), w.count, w.full) == (b"x" * 10, 1, True), "a huge line: its start"


def test_apply_edit() -> None:
    assert guestfiles.apply_edit("a b a", "b", "c", False, "/f") == ("a c a", 1)
    assert guestfiles.apply_edit("a b a", "a", "c", True, "/f") == ("c b c", 2)
    with pytest.raises(guestfiles.FileToolError, match="not found"):
        guestfiles.apply_edit("abc", "x", "y", False, "/f")
    with pytest.raises(guestfiles.FileToolError, match="2 times"):
        guestfiles.apply_edit("a a", "a", "y", False, "/f")
    with pytest.raises(guestfiles.FileToolError, match="empty"):
        guestfiles.apply_edit("a", "", "y", True, "/f")


def test_modes_and_content() -> None:
    assert [guestfiles.parse_mode(m) for m in ("644", "0755", "0o600", "4755")] == [
        0o644, 0o755, 0o600, 0o4755]
    for bad in ("999", "rwx", "", "12", "0o77777"):
        with pytest.raises(guestfiles.FileToolError):
            guestfiles.parse_mode(bad)
    assert guestfiles.decode_content("AAE=", "base64") == b"\x00\x01"
    with pytest.raises(guestfiles.FileToolError, match="base64"):
        guestfiles.decode_content("not base64!", "base64")


# --- tool error texts ----------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    pe.NotFound("VM 'x' not found"),
    pe.LimitExceeded("memory: 2048 MiB asked, 1024 MiB left"),
    pe.GuestFailed("guest: no NIC with MAC 52:54:00:00:00:01"),
    HelperUnavailable("cannot connect to /run/agentiso/helper.sock: No such file"),
    ConnectionLost(Hop.GUEST_AGENT, "the agent restarted"),
    guestfiles.FileToolError("bad\nfix it"),
    RuntimeError("a bug"),
])
def test_describe_is_cause_then_what_to_do(exc: BaseException) -> None:
    text = describe(exc, "exec")
    lines = text.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines), text
    assert "Traceback" not in text and "[" not in lines[0][:1]


def test_helper_unavailable_is_its_cause_then_the_fix_once() -> None:
    exc = HelperUnavailable("cannot connect to the agentiso helper at /x.sock: No such file")
    cause, todo = describe(exc, "exec").splitlines()
    assert cause == "helper socket: cannot connect to the agentiso helper at /x.sock: No such file"
    assert todo.startswith("Start the helper (systemctl start agentiso-helper.socket")
    assert todo.endswith("then retry.") and "systemctl" not in cause
    assert "systemctl" in str(exc), "logs and the command line get the fix too"
    custom = HelperUnavailable("it hung up during hello", advice="see its log")
    assert describe(custom, "exec") == "helper socket: it hung up during hello\nSee its log."


def test_describe_hides_internal_details() -> None:
    text = describe(KeyError("secret internals"), "exec")
    assert "secret" not in text and "internal error" in text


# --- sessions ------------------------------------------------------------------------------------


def test_session_alive_follows_the_process(tmp_path: Path) -> None:
    s = Session(tmp_path)
    assert session_alive(tmp_path, s.id)
    s.close()
    assert not session_alive(tmp_path, s.id)
    assert not session_alive(tmp_path, "s-000000000000")
    # A process that dies (SIGKILL) without closing: its session is dead.
    code = ("import sys, time; from pathlib import Path;"
            "from agentiso.frontend.sessions import Session;"
            f"s = Session(Path({str(tmp_path)!r})); print(s.id, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sid = proc.stdout.readline().strip()
        assert session_alive(tmp_path, sid)
        proc.kill()
        proc.wait()
        assert not session_alive(tmp_path, sid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- kept-open connections -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_kept_open_opens_once_and_reopens_after_invalidate() -> None:
    opened: list[int] = []
    closed: list[int] = []

    @asynccontextmanager
    async def opener() -> AsyncIterator[int]:
        n = len(opened)
        opened.append(n)
        try:
            yield n
        finally:
            closed.append(n)

    async with anyio.create_task_group() as tg:
        kept = KeptOpen(tg, opener, "test")
        values = []

        async def get() -> None:
            values.append(await kept.get())

        async with anyio.create_task_group() as inner:
            for _ in range(5):
                inner.start_soon(get)
        assert values == [0] * 5 and opened == [0]
        kept.invalidate(123)  # a stale value changes nothing
        assert await kept.get() == 0
        kept.invalidate(0)
        assert await kept.get() == 1
        await anyio.sleep(0.01)
        assert closed == [0]
        kept.close()
        await anyio.sleep(0.01)
        assert closed == [0, 1]


@pytest.mark.anyio
async def test_kept_open_raises_open_failures_to_the_caller() -> None:
    @asynccontextmanager
    async def opener() -> AsyncIterator[int]:
        raise HelperUnavailable("no helper")
        yield 0  # pragma: no cover

    async with anyio.create_task_group() as tg:
        kept = KeptOpen(tg, opener, "test")
        for _ in range(2):
            with pytest.raises(HelperUnavailable):
                await kept.get()


# --- tool schemas --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_tool_schema_compiles_and_has_no_naive_datetimes(tmp_path: Path) -> None:
    from agentiso.frontend.server import build_server

    app = build_server(parse_config(f'state_dir = "{tmp_path}"\n', cwd=tmp_path))
    tools = await app.list_tools()
    assert len(tools) >= 19
    for t in tools:
        jsonschema.Draft202012Validator.check_schema(t.input_schema)
        assert t.output_schema is not None, t.name
        jsonschema.Draft202012Validator.check_schema(t.output_schema)
        if t.name not in ("workspace_list", "workspace_create", "workspace_adopt_all",
                          "exec_parallel", "workspace_prepare", "workspace_merge"):
            assert "workspace" in t.input_schema["properties"], t.name


@pytest.mark.anyio
@pytest.mark.parametrize(("arguments", "field"), [
    ({"timeout_secs": 0}, "timeout_secs"),
    ({"command": "x" * 200_000}, "command"),
    ({"command": None}, "command"),
    ({"env": {"1BAD": "x"}}, "env"),
])
async def test_a_schema_refusal_is_one_line_of_cause_and_one_of_what_to_do(
    tmp_path: Path, arguments: dict[str, Any], field: str
) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from agentiso.frontend.server import build_server

    app = build_server(parse_config(f'state_dir = "{tmp_path}"\n', cwd=tmp_path))
    args = {k: v for k, v in {"workspace": "w", "command": "true", **arguments}.items()
            if v is not None}
    with pytest.raises(ToolError) as info:
        await app.call_tool("exec", args)
    cause, todo = str(info.value).splitlines()
    assert "refused by its input schema" in cause and field in cause, cause
    assert "input schema" in todo
    assert "pydantic" not in str(info.value) and "http" not in str(info.value)
    assert len(cause) < 300, "the refused value is not echoed"


@pytest.mark.anyio
async def test_a_schema_refusal_names_a_few_fields_and_counts_the_rest(tmp_path: Path) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from agentiso.frontend.server import build_server

    app = build_server(parse_config(f'state_dir = "{tmp_path}"\n', cwd=tmp_path))
    with pytest.raises(ToolError) as info:
        await app.call_tool("workspace_create", {"name": "Bad Name", "vcpus": 0,
                                                 "memory_mb": 1, "disk_gb": 0, "image": "B A D"})
    assert str(info.value).splitlines()[0].endswith("and 2 more"), str(info.value)


def test_the_tool_reference_is_current() -> None:
    from agentiso.frontend import tooldoc

    path = Path(__file__).resolve().parents[2] / "docs" / "tools.md"
    assert path.read_text() == tooldoc.current(), (
        "docs/tools.md is stale: regenerate it with `make docs`")


def test_sessions_of_dead_processes_are_closed_and_old_ones_forgotten(tmp_path: Path) -> None:
    import time as _time

    from agentiso.frontend.catalog import Catalog

    with Catalog.open(tmp_path / "c.db") as cat:
        cat.add_session("s-alive", 1)
        cat.add_session("s-dead", 2)
        cat.add_session("s-old", 3)
        cat.end_session("s-old")
        assert cat.prune_sessions(lambda sid: sid == "s-alive", keep_s=3600) == 0
        assert cat.get_session("s-dead").ended_at is not None
        assert cat.get_session("s-alive").ended_at is None
        _time.sleep(0.01)
        assert cat.prune_sessions(lambda sid: sid == "s-alive", keep_s=0) == 2
        assert [s.id for s in cat.list_sessions()] == ["s-alive"]


# --- quotas -----------------------------------------------------------------------------------


def _row(wid: str, session: str, *, vcpus: int = 1, memory_mb: int = 256, disk_gb: int = 2,
         state: str = "running") -> Any:
    from agentiso.frontend.catalog import WorkspaceRecord
    from agentiso.frontend.lifecycle import State

    return WorkspaceRecord(id=wid, name=wid, image="minimal", vcpus=vcpus, memory_mb=memory_mb,
                           disk_gb=disk_gb, allow_internet=False, state=State(state), vm=wid,
                           volume=wid, created_at=0.0, updated_at=0.0, session=session)


@pytest.mark.parametrize(("limit", "scope", "ask", "message"), [
    ("workspaces", "user", {"workspaces": 1}, "workspaces per user: 2 in use + 1 asked > 2"),
    ("workspaces_per_session", "session", {"workspaces": 1},
     "workspaces per session: 1 in use + 1 asked > 1"),
    ("vcpus", "user", {"vcpus": 2}, "vcpus per user: 2 in use + 2 asked > 3"),
    ("vcpus_per_session", "session", {"vcpus": 1}, "vcpus per session: 1 in use + 1 asked > 1"),
    ("memory_mb", "user", {"memory_mb": 600}, "memory per user: 512 MB in use + 600 MB"),
    ("memory_mb_per_session", "session", {"memory_mb": 300},
     "memory per session: 256 MB in use + 300 MB"),
    ("disk_gb", "user", {"disk_gb": 5}, "disk per user: 4 GB in use + 5 GB asked > 8 GB"),
    ("disk_gb_per_session", "session", {"disk_gb": 3}, "disk per session: 2 GB in use + 3 GB"),
])
def test_every_quota_refuses_naming_the_limit_the_use_and_the_request(
    limit: str, scope: str, ask: dict[str, int], message: str
) -> None:
    from agentiso.frontend import quotas
    from agentiso.frontend.config import Quotas

    generous = dict(workspaces=100, workspaces_per_session=100, vcpus=100, vcpus_per_session=100,
                    memory_mb=10**6, memory_mb_per_session=10**6, disk_gb=10**4,
                    disk_gb_per_session=10**4)
    tight = {"workspaces": 2, "workspaces_per_session": 1, "vcpus": 3, "vcpus_per_session": 1,
             "memory_mb": 1000, "memory_mb_per_session": 500, "disk_gb": 8,
             "disk_gb_per_session": 4}
    q = Quotas(**{**generous, limit: tight[limit]})
    running = [_row("ws-0000000001", "s-me"), _row("ws-0000000002", "s-other")]
    full = quotas.Ask(**{"workspaces": 0, "vcpus": 0, "memory_mb": 0, "disk_gb": 0, **ask})
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check(q, running, "s-me", full)
    assert message in str(e.value), str(e.value)
    assert e.value.scope == scope
    assert "raise [quotas]" in str(e.value)
    if limit.startswith(("vcpus", "memory")):
        # A stopped workspace takes no vCPUs or memory: the same use is reported.
        stopped = _row("ws-0000000003", "s-me", state="stopped", vcpus=8, memory_mb=8000)
        with pytest.raises(quotas.QuotaExceeded) as again:
            quotas.check(q, [*running, stopped], "s-me", full)
        assert message in str(again.value)


@pytest.mark.parametrize(("limit", "value", "message"), [
    ("workspaces", 4, "workspaces per user: 1 in use + 4 asked > 4"),
    ("vcpus", 8, "vcpus per user: 2 in use + 8 asked > 8"),
    ("memory_mb", 3000, "memory per user: 512 MB in use + 3072 MB asked > 3000 MB"),
    ("disk_gb_per_session", 12, "disk per session: 3 GB in use + 12 GB asked > 12 GB"),
])
def test_a_fork_batch_is_asked_whole(limit: str, value: int, message: str) -> None:
    """workspace_fork checks count times the source's size before anything is
    made: a batch whose single forks would each fit is refused as a whole."""
    from agentiso.frontend import quotas
    from agentiso.frontend.config import Quotas
    from agentiso.frontend.forks import batch_ask

    src = _row("ws-0000000001", "s-me", vcpus=2, memory_mb=512, disk_gb=3)
    q = Quotas(**{limit: value})  # type: ignore[arg-type]
    assert batch_ask(src, 4) == quotas.Ask(workspaces=4, vcpus=8, memory_mb=2048, disk_gb=12)
    quotas.check(q, [src], "s-me", batch_ask(src, 1))  # one fork fits
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check(q, [src], "s-me", batch_ask(src, 6 if limit == "memory_mb" else 4))
    assert message in str(e.value), str(e.value)
    no_size = _row("ws-0000000002", "s-me", disk_gb=None)  # type: ignore[arg-type]
    assert batch_ask(no_size, 3).disk_gb == 3  # an image-sized disk counts 1 GB each
