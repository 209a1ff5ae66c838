"""The helper's socket server for real: socket activation, SO_PEERCRED
authorization of unprivileged uids, hostile clients, and load."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

from agentiso.frontend.helper_client import HelperUnavailable, connect_helper
from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import ErrorCode
from agentiso.protocol.framing import FrameDecoder, encode_frame
from tests.support.helper_process import HelperProcess, public_tmpdir, run_as, running_helper

GROUP = 64321  # a gid that exists only for this test: setpriv takes numbers
USER = 64322


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    with running_helper(group=GROUP) as h:
        yield h


def _raw(sock_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock_path))
    return s


def _read_frames(s: socket.socket) -> list[hp.HelperResponse]:
    """Read until the helper closes or stops sending (timeout)."""
    dec = FrameDecoder(hp.HELPER_MAX_FRAME)
    out: list[hp.HelperResponse] = []
    s.settimeout(2)
    try:
        while data := s.recv(65536):
            out.extend(hp.response_codec.decode(f) for f in dec.feed(data))
    except TimeoutError:
        pass
    return out


def _hello(s: socket.socket) -> None:
    s.sendall(encode_frame(hp.request_codec.encode(hp.Hello(id=1, version=1))))
    dec = FrameDecoder()
    frames: list[bytes] = []
    while not frames:
        frames = dec.feed(s.recv(65536))
    assert isinstance(hp.response_codec.decode(frames[0]), hp.HelloOk)


def _assert_still_serving(helper: HelperProcess) -> None:
    with BlockingHelperClient(str(helper.socket)) as c:
        assert isinstance(c.request(hp.Ping(id=0)), hp.Pong)


def test_socket_activated_helper_answers_ping(helper: HelperProcess) -> None:
    with BlockingHelperClient(str(helper.socket)) as c:
        assert isinstance(c.request(hp.Ping(id=0)), hp.Pong)
        who = c.request(hp.WhoAmI(id=0))
        assert isinstance(who, hp.Identity) and who.uid == 0 and who.admin
    assert '"activation": "systemd"' in helper.log()


def test_status_command(helper: HelperProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentiso.privhelper.cli", "status", "--socket", str(helper.socket)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "agentiso-helper" in out and "uid 0" in out and "uptime" in out


CLIENT = textwrap.dedent(
    """
    import sys
    from agentiso.protocol import helper as hp
    from agentiso.protocol.blocking import BlockingHelperClient
    from agentiso.protocol.errors import PermissionDenied
    try:
        with BlockingHelperClient(sys.argv[1] if len(sys.argv) > 1 else {sock!r}) as c:
            who = c.request(hp.WhoAmI(id=0))
            print("SERVED", who.uid, who.gid, who.admin)
    except PermissionDenied as e:
        print("REFUSED", e.code, e.message)
    """
)


def test_unprivileged_member_of_group_is_served(helper: HelperProcess) -> None:
    assert oct(helper.socket.stat().st_mode)[-3:] == "666"
    r = run_as(USER, USER, [GROUP], CLIENT.format(sock=str(helper.socket)))
    assert r.stdout.split() == ["SERVED", str(USER), str(USER), "False"], r.stderr


def test_unprivileged_member_by_primary_group_is_served(helper: HelperProcess) -> None:
    r = run_as(USER, GROUP, [], CLIENT.format(sock=str(helper.socket)))
    assert r.stdout.startswith("SERVED"), r.stderr


def test_outsider_is_refused_even_on_a_world_writable_socket(helper: HelperProcess) -> None:
    r = run_as(USER, USER, [USER + 1], CLIENT.format(sock=str(helper.socket)))
    assert r.stdout.startswith("REFUSED permission_denied"), (r.stdout, r.stderr)
    assert "refused" in helper.log()


def test_refused_peer_gets_typed_error_before_sending_anything(helper: HelperProcess) -> None:
    code = textwrap.dedent(
        f"""
        import socket
        from agentiso.protocol import helper as hp
        from agentiso.protocol.framing import FrameDecoder
        s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect({str(helper.socket)!r})
        dec = FrameDecoder(); frames = []
        while data := s.recv(4096):
            frames += dec.feed(data)
        msg = hp.response_codec.decode(frames[0])
        print(type(msg).__name__, msg.id, msg.code, len(frames))
        """
    )
    r = run_as(USER, USER, [], code)
    assert r.stdout.split() == ["Error", "0", "permission_denied", "1"], r.stderr


def test_garbage_gets_typed_error_and_helper_keeps_serving(helper: HelperProcess) -> None:
    with _raw(helper.socket) as s:
        _hello(s)
        s.sendall(encode_frame(b"\xc1\xc1 this is not msgpack"))
        s.sendall(encode_frame(msgspec.msgpack.encode({"type": "launch_missiles", "id": 9})))
        s.sendall(encode_frame(msgspec.msgpack.encode({"type": "ping", "id": 10, "x": 1})))
        s.sendall(encode_frame(hp.request_codec.encode(hp.Ping(id=11))))
        s.shutdown(socket.SHUT_WR)
        frames = _read_frames(s)
    by_id = {f.id: f for f in frames}
    assert isinstance(by_id[0], hp.Error) and by_id[0].code == ErrorCode.INVALID
    assert isinstance(by_id[9], hp.Error) and by_id[9].code == ErrorCode.INVALID
    assert isinstance(by_id[10], hp.Error) and by_id[10].code == ErrorCode.INVALID
    assert isinstance(by_id[11], hp.Pong)
    _assert_still_serving(helper)


def test_oversize_length_prefix_gets_error_and_close(helper: HelperProcess) -> None:
    with _raw(helper.socket) as s:
        _hello(s)
        s.sendall(struct.pack(">I", hp.HELPER_MAX_FRAME + 1) + b"x" * 100)
        frames = _read_frames(s)
        assert [(f.id, getattr(f, "code", None)) for f in frames] == [(0, ErrorCode.PROTOCOL)]
        assert s.recv(10) == b""  # closed
    _assert_still_serving(helper)


def test_truncated_frame_closes_only_that_connection(helper: HelperProcess) -> None:
    with _raw(helper.socket) as s:
        _hello(s)
        s.sendall(encode_frame(hp.request_codec.encode(hp.Ping(id=5)))[:-1])
        s.shutdown(socket.SHUT_WR)
        assert _read_frames(s) == []
    _assert_still_serving(helper)


def test_garbage_instead_of_hello_is_refused(helper: HelperProcess) -> None:
    with _raw(helper.socket) as s:
        s.sendall(encode_frame(hp.request_codec.encode(hp.Ping(id=3))))
        frames = _read_frames(s)
    assert len(frames) == 1 and isinstance(frames[0], hp.Error)
    assert frames[0].code == ErrorCode.PROTOCOL and frames[0].id == 3


def test_version_mismatch_is_a_clear_error(helper: HelperProcess) -> None:
    with _raw(helper.socket) as s:
        s.sendall(encode_frame(hp.request_codec.encode(hp.Hello(id=1, version=999))))
        frames = _read_frames(s)
    assert len(frames) == 1 and isinstance(frames[0], hp.Error)
    assert frames[0].code == ErrorCode.VERSION_MISMATCH and "999" in frames[0].message


@pytest.mark.anyio
async def test_200_concurrent_clients_each_sending_50_pings(helper: HelperProcess) -> None:
    done = 0

    async def client() -> None:
        nonlocal done
        async with connect_helper(str(helper.socket)) as c, anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(c.ping)
        done += 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(client)
    assert done == 200
    _assert_still_serving(helper)


@pytest.mark.anyio
async def test_async_client_missing_socket_is_helper_unavailable(helper: HelperProcess) -> None:
    with pytest.raises(HelperUnavailable, match="cannot connect"):
        async with connect_helper(str(helper.workdir / "missing.sock")):
            pass


def test_async_client_refusal_is_permission_denied(helper: HelperProcess) -> None:
    code = textwrap.dedent(
        f"""
        import anyio
        from agentiso.frontend.helper_client import connect_helper
        from agentiso.protocol.errors import PermissionDenied
        async def main():
            try:
                async with connect_helper({str(helper.socket)!r}) as c:
                    await c.ping()
                print("SERVED")
            except PermissionDenied as e:
                print("REFUSED", e.code)
        anyio.run(main)
        """
    )
    r = run_as(USER, USER, [], code)
    assert r.stdout.split() == ["REFUSED", "permission_denied"], r.stderr
    r = run_as(USER, USER, [GROUP], code)
    assert r.stdout.split() == ["SERVED"], r.stderr


def test_helper_binds_its_own_socket_and_notifies_ready() -> None:
    """Without socket activation: binds --socket with the configured mode and
    sends READY=1 to NOTIFY_SOCKET."""
    d = public_tmpdir("agentiso-bind-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.settimeout(20)
    sock = d / "run" / "helper.sock"
    config = d / "helper.toml"
    config.write_text(f'[vm]\nrun_dir = "{d}/vms"\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(d / "notify"))
    # Its own network namespace and state: nothing of the host's is touched.
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-m", "agentiso.privhelper.cli", "serve",
         "--config", str(config), "--socket", str(sock), "--group", str(GROUP),
         "--state-dir", str(d / "state"), "--images-dir", str(d / "images")],
        env=env, stderr=subprocess.PIPE,
    )
    try:
        assert notify.recv(100) == b"READY=1"
        st = sock.stat()
        assert oct(st.st_mode)[-3:] == "660" and st.st_gid == GROUP
        with BlockingHelperClient(str(sock)) as c:
            assert isinstance(c.request(hp.Ping(id=0)), hp.Pong)
    finally:
        proc.terminate()
        proc.wait(10)
        notify.close()
        shutil.rmtree(d)
