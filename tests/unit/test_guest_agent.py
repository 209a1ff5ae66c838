"""The real agent, in-process (and as a subprocess), over a socketpair, driven by
the real GuestClient."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from agentiso.frontend.guest_client import GuestClient
from agentiso.guest.agent import Agent
from agentiso.guest.channel import FdChannel
from agentiso.protocol import guest as gp
from agentiso.protocol.errors import (
    AlreadyExists,
    Cancelled,
    Conflict,
    ErrorCode,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RemoteTimeout,
    Unavailable,
)
from agentiso.protocol.framing import encode_frame

pytestmark = pytest.mark.anyio


@dataclass
class Pair:
    agent: Agent
    client: GuestClient
    stream: anyio.abc.SocketStream


@asynccontextmanager
async def agent_pair(
    max_inflight: int = 64, secret: bytes | None = None, client_secret: bytes | None = None
) -> AsyncIterator[Pair]:
    """An in-process agent serving one end of a socketpair; a GuestClient on the other."""
    ours, theirs = socket.socketpair()
    agent = Agent(pid1=False, max_inflight=max_inflight)
    agent.start()
    agent.mark_listening()
    chan = FdChannel(theirs.detach(), "socketpair", resyncable=True)
    task = asyncio.get_running_loop().create_task(agent.serve(chan, secret))
    stream = await anyio.abc.SocketStream.from_socket(ours)
    try:
        async with GuestClient.connect(
            stream, secret=client_secret or secret, hello_timeout=10
        ) as client:
            yield Pair(agent, client, stream)
    finally:
        await stream.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        agent.close()
        os.close(chan.fd)


MiB = 1024 * 1024
VMADDR_CID_LOCAL = 1  # <linux/vm_sockets.h>; not exported by Python 3.11's socket


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with agent_pair() as p:
        yield p


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_hello_and_ping(pair: Pair) -> None:
    hello = pair.client.hello
    assert hello is not None
    assert hello.version == gp.GUEST_PROTOCOL_VERSION
    assert hello.transport == "socketpair" and not hello.pid1
    assert len(hello.sync_nonce) == gp.SYNC_NONCE_LEN  # the answer to our sync marker
    assert hello.boot.listen >= hello.boot.agent_start
    assert (await pair.client.ping()).uptime_s > 0


async def test_exec_output_exit_code_and_signal(pair: Pair) -> None:
    r = await pair.client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.signal, r.stdout, r.stderr) == (3, None, b"out\n", b"err\n")
    r = await pair.client.exec(shell="kill -TERM $$")
    assert (r.exit_code, r.signal) == (None, 15)


async def test_20_mib_of_output_without_deadlock(pair: Pair) -> None:
    n = 20 * MiB
    cmd = f"head -c {n} /dev/zero; head -c {n} /dev/zero >&2"
    # Streamed: every byte of both streams arrives.
    r = await pair.client.exec(shell=cmd, stdout_cap=n, stderr_cap=n, timeout_s=60)
    assert r.exit_code == 0
    assert len(r.stdout) == n and len(r.stderr) == n
    assert r.stdout_bytes == n and not r.stdout_truncated
    # Collected with caps: the rest is drained and counted, the command is not blocked.
    r = await pair.client.exec(shell=cmd, stdout_cap=1000, stderr_cap=10, timeout_s=60)
    assert r.exit_code == 0
    assert (len(r.stdout), len(r.stderr)) == (1000, 10)
    assert r.stdout_truncated and r.stderr_truncated
    assert (r.stdout_bytes, r.stderr_bytes) == (n, n)


async def test_streaming_exec_delivers_chunks_in_order(pair: Pair) -> None:
    got: list[tuple[str, bytes]] = []

    async def on_output(stream: gp.OutputStream, data: bytes) -> None:
        got.append((stream, data))
        await anyio.lowlevel.checkpoint()  # a slow consumer: credit holds the command back

    r = await pair.client.exec(shell="seq 1 20000", on_output=on_output, window=2)
    assert r.exit_code == 0
    out = b"".join(d for s, d in got if s == "stdout")
    assert out == b"".join(b"%d\n" % i for i in range(1, 20001))


async def test_timeout_kills_the_whole_process_group(pair: Pair) -> None:
    t0 = time.monotonic()
    r = await pair.client.exec(shell="sleep 300 & echo $!; sleep 300", timeout_s=1.0,
                               stdout_cap=100)
    assert r.timed_out and r.signal == 9 and r.exit_code is None
    assert time.monotonic() - t0 < 30
    grandchild = int(r.stdout.split()[0])
    deadline = time.monotonic() + 5
    while not _gone_or_zombie(grandchild):
        assert time.monotonic() < deadline, "grandchild survived the timeout"
        await anyio.sleep(0.05)


async def test_background_leftover_does_not_hold_exec(pair: Pair) -> None:
    r = await pair.client.exec(shell="sleep 30 & echo $!", timeout_s=20)
    try:
        assert r.exit_code == 0 and not r.timed_out
        assert r.duration_s < 10
    finally:
        os.kill(int(r.stdout.split()[0]), 9)


async def test_stdin_env_cwd_and_env_defaults(pair: Pair, tmp_path: Path) -> None:
    c = pair.client
    r = await c.exec(["cat"], stdin=b"x" * 300_000)
    assert r.stdout == b"x" * 300_000
    r = await c.exec(["sh", "-c", "pwd; echo $FOO"], cwd=str(tmp_path), env={"FOO": "bar"})
    assert r.stdout == f"{tmp_path}\nbar\n".encode()
    await c.set_env(set={"AGENTISO_T": "1"})
    r = await c.exec(["sh", "-c", "echo $AGENTISO_T"])
    assert r.stdout == b"1\n"
    r = await c.exec(["sh", "-c", "echo $AGENTISO_T"], env={"AGENTISO_T": "2"})
    assert r.stdout == b"2\n"
    await c.set_env(unset=["AGENTISO_T"])
    assert (await c.exec(["sh", "-c", "echo x$AGENTISO_T"])).stdout == b"x\n"


async def test_exec_typed_errors(pair: Pair, tmp_path: Path) -> None:
    c = pair.client
    with pytest.raises(NotFound):
        await c.exec(["/nonexistent/binary"])
    with pytest.raises(NotFound):
        await c.exec(["true"], cwd=str(tmp_path / "missing"))
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program")
    with pytest.raises(PermissionDenied):
        await c.exec([str(plain)])
    with pytest.raises(InvalidRequest):  # refused by the client before sending
        await c.exec(["a\x00b"])


async def test_concurrent_exec_and_file_read(pair: Pair, tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_bytes(b"payload")
    order: list[str] = []
    running = anyio.Event()

    async def slow_exec() -> None:
        # The read starts once the command runs (its output says so), and has
        # seconds to finish before it ends: a margin that holds under load.
        r = await pair.client.exec(shell="echo started; sleep 3",
                                   on_output=lambda stream, data: running.set())
        assert r.exit_code == 0
        order.append("exec")

    async def read() -> None:
        await running.wait()
        data = await pair.client.read_file(str(f))
        assert data.data == b"payload" and data.eof
        order.append("read")

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_exec)
        tg.start_soon(read)
    assert order == ["read", "exec"]


async def test_garbage_frames_get_typed_errors_and_the_agent_keeps_serving(pair: Pair) -> None:
    c = pair.client
    for body in (b"\xc1", b"not msgpack at all", b"\x81\xa4type\xa4ping",
                 b"\x82\xa4type\xa4exec\xa2id\x05"):
        await c.send_raw(encode_frame(body))
    await c.send_raw(encode_frame(gp.request_codec.encode(gp.Ping(id=0))))
    await c.ping()
    with anyio.fail_after(5):
        while len(c.connection_errors) < 4:
            await anyio.sleep(0.01)
    assert all(e.code in (ErrorCode.INVALID,) for e in c.connection_errors)


async def test_oversize_frame_then_resync(pair: Pair) -> None:
    c = pair.client
    assert c.hello is not None
    old = c.hello.session
    await c.send_raw((gp.GUEST_MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 1000)
    with anyio.fail_after(5):
        while not c.connection_errors:
            await anyio.sleep(0.01)
    assert c.connection_errors[0].code == ErrorCode.PROTOCOL
    # More junk while it waits for the marker is discarded.
    await c.send_raw(b"\x00\x00\x00\x05junk!" * 100)
    hello = await c.resync()
    assert hello.session == old + 1
    assert (await c.exec(["echo", "back"])).stdout == b"back\n"


async def test_flood_waits_instead_of_growing(tmp_path: Path) -> None:
    async with agent_pair(max_inflight=4) as p:
        log = tmp_path / "log"
        script = f"echo start >> {log}; sleep 0.2; echo end >> {log}"
        frames = b"".join(
            encode_frame(gp.request_codec.encode(gp.Exec(id=10_000 + i, shell=script)))
            for i in range(16)
        )
        pings = b"".join(encode_frame(gp.request_codec.encode(gp.Ping(id=20_000 + i)))
                         for i in range(2000))
        await p.client.send_raw(frames + pings)
        # The client's own request is served once the flood has drained through.
        with anyio.fail_after(60):
            await p.client.ping()
            while log.read_text().count("end") < 16:
                await anyio.sleep(0.05)
        running = peak = 0
        for line in log.read_text().split():
            running += 1 if line == "start" else -1
            peak = max(peak, running)
        assert peak <= 4


async def test_jobs_start_poll_kill_list_forget(pair: Pair) -> None:
    c = pair.client
    started = await c.job_start(shell="for i in 1 2 3; do echo line$i; done; echo e >&2; sleep 30")
    out = b""
    off = 0
    with anyio.fail_after(10):
        while out.count(b"\n") < 3:
            st = await c.job_poll(started.job, stdout_offset=off, wait_s=2)
            out += st.stdout.data
            off = st.stdout.offset + len(st.stdout.data)
    assert out == b"line1\nline2\nline3\n"
    assert st.info.running and st.info.pid == started.pid
    assert [j.job for j in await c.job_list()] == [started.job]
    with pytest.raises(Conflict):
        await c.job_forget(started.job)
    await c.job_kill(started.job, 9)
    with anyio.fail_after(10):
        while (st := await c.job_poll(started.job, stdout_offset=off, wait_s=1)).info.running:
            pass
    assert st.info.signal == 9 and st.stderr.data == b"e\n"
    await c.job_forget(started.job)
    with pytest.raises(NotFound):
        await c.job_poll(started.job)


async def test_job_ring_buffer_reports_lost_output(pair: Pair) -> None:
    c = pair.client
    j = await c.job_start(shell="head -c 100000 /dev/zero", ring_bytes=4096)
    with anyio.fail_after(10):
        while (st := await c.job_poll(j.job, wait_s=1)).info.running:
            pass
    assert st.info.exit_code == 0 and st.stdout.total == 100000
    assert st.stdout.lost == 100000 - 4096 and len(st.stdout.data) == 4096


async def test_job_timeout_kills_it(pair: Pair) -> None:
    j = await pair.client.job_start(["sleep", "60"], timeout_s=0.5)
    with anyio.fail_after(10):
        while (st := await pair.client.job_poll(j.job, wait_s=1)).info.running:
            pass
    assert st.info.timed_out and st.info.signal == 9


async def test_file_operations_and_typed_errors(pair: Pair, tmp_path: Path) -> None:
    c = pair.client
    d = tmp_path / "a" / "b"
    await c.mkdir(str(d), parents=True, perm=0o700)
    assert (d.stat().st_mode & 0o777) == 0o700
    with pytest.raises(AlreadyExists):
        await c.mkdir(str(d))
    await c.mkdir(str(d), exist_ok=True)
    f = d / "f.txt"
    assert await c.write_file(str(f), b"hello", perm=0o640) == 5
    assert (f.stat().st_mode & 0o777) == 0o640
    assert await c.write_file(str(f), b" world", mode="append") == 11
    assert await c.write_file(str(f), b"J", mode="overwrite", offset=6) == 11
    assert f.read_bytes() == b"hello Jorld"
    with pytest.raises(AlreadyExists):
        await c.write_file(str(f), b"x", mode="create")
    with pytest.raises(NotFound):
        await c.write_file(str(tmp_path / "no" / "x"), b"x")
    await c.write_file(str(tmp_path / "new" / "deep" / "x"), b"x", parents=True)
    part = await c.read_file(str(f), offset=6, length=3)
    assert (part.data, part.eof, part.size) == (b"Jor", False, 11)
    assert (await c.read_file(str(f), offset=6, length=5)).eof  # reaches st_size
    proc = await c.read_file("/proc/self/status")  # st_size 0, yet content
    assert proc.size == 0 and b"Pid:" in proc.data and proc.eof
    st = await c.stat(str(f))
    assert (st.kind, st.size, st.perm) == ("file", 11, 0o640)
    os.symlink("f.txt", d / "link")
    assert (await c.stat(str(d / "link"))).symlink_target == "f.txt"
    assert (await c.stat(str(d / "link"), follow_symlinks=True)).kind == "file"
    names = [(e.name, e.kind) for e in (await c.list_dir(str(d))).entries]
    assert names == [("f.txt", "file"), ("link", "symlink")]
    listing = await c.list_dir(str(d), limit=1)
    assert listing.truncated and len(listing.entries) == 1
    os.close(os.open(os.path.join(os.fsencode(d), b"bad\xff"), os.O_CREAT | os.O_WRONLY))
    raw = [e for e in (await c.list_dir(str(d))).entries if e.raw_name is not None]
    assert raw[0].raw_name == b"bad\xff"
    with pytest.raises(NotFound):
        await c.read_file(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest):
        await c.read_file(str(d))
    with pytest.raises(Conflict):
        await c.remove(str(tmp_path / "a"))
    await c.remove(str(tmp_path / "a"), recursive=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(NotFound):
        await c.remove(str(tmp_path / "a"))
    await c.remove(str(tmp_path / "a"), missing_ok=True)
    with pytest.raises(InvalidRequest):
        await c.remove("/", recursive=True)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        if os.geteuid() != 0:
            with pytest.raises(PermissionDenied):
                await c.list_dir(str(locked))
    finally:
        locked.chmod(0o700)


async def test_upload_download_round_trip_with_hash(pair: Pair, tmp_path: Path) -> None:
    c = pair.client
    src = tmp_path / "src.bin"
    data = os.urandom(9 * MiB + 123)
    src.write_bytes(data)
    target = tmp_path / "guest" / "file.bin"
    up = await c.upload_file(src, str(target), parents=True, perm=0o600, window=4)
    assert up.size == len(data) and up.sha256 == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data and (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temp left
    back = tmp_path / "back.bin"
    down = await c.download_file(str(target), back, chunk_size=64 * 1024, window=3)
    assert down.sha256 == up.sha256 and back.read_bytes() == data
    part = bytearray()

    async def collect(b: bytes) -> None:
        part.extend(b)

    r = await c.download(str(target), collect, offset=100, length=1000)
    assert bytes(part) == data[100:1100] and r.size == 1000
    with pytest.raises(AlreadyExists):
        await c.upload_bytes(b"x", str(target), exclusive=True)
    with pytest.raises(NotFound):
        await c.download_file(str(tmp_path / "missing"), tmp_path / "m")


async def test_failed_upload_leaves_no_temp_file(pair: Pair, tmp_path: Path) -> None:
    c = pair.client

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise RuntimeError("host file vanished")

    with pytest.raises(RuntimeError):
        await c.upload(str(tmp_path / "x"), chunks())
    # The client cancels the abandoned upload; the agent removes its temp file.
    with anyio.fail_after(5):
        while os.listdir(tmp_path):
            await anyio.sleep(0.02)
    assert (await c.ping()).uptime_s > 0


async def test_client_timeout_cancels_the_remote_command(pair: Pair, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    req = gp.Exec(id=0, shell=f"echo $$ > {pidfile}; exec sleep 300")
    with pytest.raises(RemoteTimeout):
        await pair.client.request(req, gp.ExecResult, timeout=1.0)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone_or_zombie(pid):
        assert time.monotonic() < deadline, "cancelled command still running"
        await anyio.sleep(0.05)


async def test_cancel_kills_the_command(pair: Pair) -> None:
    c = pair.client
    seen = anyio.Event()
    pids: list[int] = []

    def on_output(stream: gp.OutputStream, data: bytes) -> None:
        pids.extend(int(x) for x in data.split())
        seen.set()

    async def run() -> None:
        with pytest.raises(Cancelled):
            await c.exec(shell="echo $$; exec sleep 300", on_output=on_output)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            await seen.wait()
        (rid,) = list(c._pending)  # the exec is the only request in flight
        await c.send_raw(encode_frame(gp.request_codec.encode(gp.Cancel(id=999, target=rid))))
    deadline = time.monotonic() + 5
    while not _gone_or_zombie(pids[0]):
        assert time.monotonic() < deadline
        await anyio.sleep(0.05)


async def test_secret_handshake() -> None:
    secret = b"k" * 32
    async with agent_pair(secret=secret) as p:
        assert (await p.client.exec(["true"])).exit_code == 0


async def test_wrong_secret_is_refused() -> None:
    with pytest.raises(PermissionDenied):
        async with agent_pair(secret=b"k" * 32, client_secret=b"x" * 32):
            pass


async def test_agent_as_a_subprocess() -> None:
    ours, theirs = socket.socketpair()
    proc = await anyio.open_process(
        [sys.executable, "-m", "agentiso.guest", "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=None, stderr=None,
    )
    theirs.close()
    try:
        stream = await anyio.abc.SocketStream.from_socket(ours)
        async with GuestClient.connect(stream, hello_timeout=30) as c:
            assert (await c.exec(["echo", "hi"])).stdout == b"hi\n"
            await c.shutdown()
        with anyio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        ours.close()


async def test_resync_restarts_the_session_in_place(pair: Pair, tmp_path: Path) -> None:
    """What a reconnecting host does: the old session's work stops, a new one starts."""
    c = pair.client
    pidfile = tmp_path / "pid"
    failed: list[BaseException] = []

    async def long_exec() -> None:
        try:
            await c.exec(shell=f"echo $$ > {pidfile}; exec sleep 300")
        except Unavailable as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_exec)
        with anyio.fail_after(10):
            while not pidfile.exists() or not pidfile.read_text():
                await anyio.sleep(0.02)
        await c.send_raw(b"\x00\x00\x00")  # a partial frame header from the "old host"
        await c.send_raw(gp.HOST_SYNC_MAGIC[:5])  # marker split across writes
        await c.send_raw(gp.HOST_SYNC_MAGIC[5:] + b"N" * gp.SYNC_NONCE_LEN)
        await c.resync()
    assert failed, "the in-flight exec should fail when the session restarts"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone_or_zombie(pid):
        assert time.monotonic() < deadline, "the old session's command survived"
        await anyio.sleep(0.05)
    assert (await c.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_chunks_arriving_before_the_upload_task_runs(pair: Pair, tmp_path: Path) -> None:
    """The whole upload in one write: every chunk is routed before the handler
    has run once (this used to overflow a placeholder inbox and strand the id)."""
    target = tmp_path / "burst.bin"
    data = [os.urandom(16 * 1024) for _ in range(8)]  # all in one read
    digest = hashlib.sha256(b"".join(data)).hexdigest()
    frames = [gp.UploadBegin(id=777, path=str(target), window=8)]
    frames += [gp.UploadChunk(id=777, seq=i + 1, data=d) for i, d in enumerate(data)]
    frames.append(gp.UploadEnd(id=777, chunks=8, sha256=digest))
    await pair.client.send_raw(b"".join(encode_frame(gp.request_codec.encode(f))
                                        for f in frames))
    with anyio.fail_after(10):
        while not target.exists():
            await anyio.sleep(0.02)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    # The id is free again: a request with it is served, not refused as in flight.
    await pair.client.send_raw(encode_frame(gp.request_codec.encode(gp.Ping(id=777))))
    await pair.client.ping()
    assert not pair.client.connection_errors


async def test_finished_jobs_are_evicted_read_ones_first(pair: Pair) -> None:
    c = pair.client
    pair.agent.state.jobs.max_finished = 2
    first = await c.job_start(["true"])
    with anyio.fail_after(10):
        while (await c.job_poll(first.job, wait_s=1)).info.running:
            pass  # this poll saw its end and all output: evicted first
    unread = [(await c.job_start(shell="echo x")).job for _ in range(2)]
    with anyio.fail_after(10):
        while any(j.running for j in await c.job_list()):
            await anyio.sleep(0.05)
    assert sorted(j.job for j in await c.job_list()) == unread
    with pytest.raises(NotFound):
        await c.job_poll(first.job)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_big_transfers_run_in_bounded_agent_memory(tmp_path: Path) -> None:
    """192 MiB up and down through an agent subprocess: its peak RSS stays far
    below the file size (credit windows bound what it holds)."""
    size = 192 * MiB
    src = tmp_path / "src.bin"
    with src.open("wb") as f:
        f.truncate(size)  # sparse: reading it costs no disk
    ours, theirs = socket.socketpair()
    proc = await anyio.open_process(
        [sys.executable, "-m", "agentiso.guest", "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=None, stderr=None,
    )
    theirs.close()
    try:
        stream = await anyio.abc.SocketStream.from_socket(ours)
        async with GuestClient.connect(stream, hello_timeout=30) as c:
            dest = tmp_path / "in-guest.bin"
            up = await c.upload_file(src, str(dest), chunk_size=MiB, window=8)
            assert up.size == size
            down = await c.download_file(str(dest), tmp_path / "back.bin", chunk_size=MiB,
                                         window=8)
            assert down.sha256 == up.sha256
            peak = _peak_rss_mib(proc.pid)
            print(f"agent peak RSS {peak:.1f} MiB")
            assert peak < 100, f"agent peak RSS {peak:.0f} MiB for a {size // MiB} MiB file"
            await c.shutdown()
        with anyio.fail_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        ours.close()
        for name in ("src.bin", "in-guest.bin", "back.bin"):  # 400 MB: not kept for later
            (tmp_path / name).unlink(missing_ok=True)


async def test_unix_listener_with_secret_survives_bad_clients(tmp_path: Path) -> None:
    """The socket transport of the agent (what vsock uses): every connection
    must authenticate first; refused or broken connections leave it serving."""
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)
    path = tmp_path / "agent.sock"
    proc = await anyio.open_process(
        [sys.executable, "-m", "agentiso.guest", "--unix", str(path),
         "--secret-file", str(tmp_path / "secret")],
        stdin=subprocess.DEVNULL, stdout=None, stderr=None,
    )
    try:
        with anyio.fail_after(30):
            while not path.exists():
                await anyio.sleep(0.05)
        with pytest.raises(PermissionDenied):
            async with await anyio.connect_unix(path) as s, \
                    GuestClient.connect(s, secret=b"w" * 32, hello_timeout=30):
                pass  # 30 s: the refusal is the event; the timeout only a margin
        async with await anyio.connect_unix(path) as s:  # garbage, then hang up
            await s.send(b"\xff" * 100)
        async with await anyio.connect_unix(path) as s1, \
                await anyio.connect_unix(path) as s2, \
                GuestClient.connect(s1, secret=secret) as c1, \
                GuestClient.connect(s2, secret=secret) as c2:
            assert c1.hello is not None and c1.hello.transport == "unix"
            r1, r2 = await c1.exec(["echo", "1"]), await c2.exec(["echo", "2"])
            assert (r1.stdout, r2.stdout) == (b"1\n", b"2\n")
            j = await c1.job_start(["sleep", "30"])  # jobs belong to the agent,
            assert j.job in [i.job for i in await c2.job_list()]  # not the connection
            await c2.job_kill(j.job, 9)
    finally:
        proc.kill()
        await proc.wait()


async def test_vsock_listener_demands_the_secret() -> None:
    """Over real AF_VSOCK when the host can loop it back (vsock_loopback);
    elsewhere the same session code is covered over unix sockets above."""
    from agentiso.guest.transport import serve_listener, vsock_listener

    port = 40000 + os.getpid() % 20000
    try:
        listener = vsock_listener(port)
    except OSError as exc:
        pytest.skip(reason=f"cannot listen on AF_VSOCK here: {exc}")
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect((VMADDR_CID_LOCAL, port))
    except OSError as exc:
        listener.close()
        pytest.skip(reason=f"no vsock loopback transport on this host ({exc}); "
                    "the vsock path runs only inside VMs with vhost-vsock")
    finally:
        probe.close()
    secret = os.urandom(32)
    async with agent_pair() as p, anyio.create_task_group() as tg:
        tg.start_soon(serve_listener, listener, "vsock", p.agent.serve, secret)
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        await anyio.to_thread.run_sync(sock.connect, (VMADDR_CID_LOCAL, port))
        stream = await anyio.abc.SocketStream.from_socket(sock)
        async with GuestClient.connect(stream, secret=secret) as c:
            assert c.hello is not None and c.hello.transport == "vsock"
            assert (await c.exec(["true"])).exit_code == 0
        tg.cancel_scope.cancel()
    listener.close()


async def test_timeout_ends_a_streaming_exec_whose_host_gives_no_credit(pair: Pair) -> None:
    """The host never acknowledges output: the command blocks on its pipe, the
    deadline kills it, and the exec still answers."""
    c = pair.client
    req = gp.Exec(id=0, shell="yes", stream=True, window=1, timeout_s=1.0,
                  stdout_cap=2**40)
    async with c._open(req, buffer=64) as pending:  # receive, never ack
        with anyio.fail_after(20):
            while True:
                msg = await pending.recv.receive()
                if isinstance(msg, gp.ExecResult):
                    break
    assert msg.timed_out and msg.signal == 9


async def test_machine_wide_changes_are_refused_outside_a_vm(pair: Pair) -> None:
    """Not PID 1 (here: inside pytest on the host) the agent must not rename,
    re-address or freeze the machine it runs on."""
    c = pair.client
    with pytest.raises(PermissionDenied):
        await c.set_hostname("not-the-host")
    with pytest.raises(PermissionDenied):
        await c.configure_network(interface="lo", address="127.0.0.1", prefix=8)
    with pytest.raises(PermissionDenied):
        await c.freeze()
    assert socket.gethostname() != "not-the-host"
    await c.thaw()  # nothing frozen: a no-op
    await c.sync()


async def test_a_frame_left_incomplete_is_abandoned(pair: Pair) -> None:
    """A host that vanished mid-frame: the next host's sync marker would be
    swallowed as that frame's body; after MID_FRAME_STALL_S the agent drops the
    partial frame and the (resent) marker gets through."""
    from agentiso.guest.connection import MID_FRAME_STALL_S

    c = pair.client
    await c.send_raw((1000).to_bytes(4, "big") + b"partial body")
    t0 = anyio.current_time()
    hello = await c.resync(timeout=MID_FRAME_STALL_S + 10)
    assert anyio.current_time() - t0 >= MID_FRAME_STALL_S - 1
    assert hello.sync_nonce
    assert (await c.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_a_long_stream_of_frames_is_not_mistaken_for_a_stall(pair: Pair) -> None:
    """Reads that always end mid-frame, for longer than MID_FRAME_STALL_S, are
    a busy channel, not a dead frame."""
    from agentiso.guest.connection import MID_FRAME_STALL_S

    c = pair.client
    one = len(encode_frame(gp.request_codec.encode(gp.Ping(id=60_000))))
    frames = b"".join(encode_frame(gp.request_codec.encode(gp.Ping(id=60_000 + i)))
                      for i in range(400))
    assert len(frames) == 400 * one
    # Each write ends half-way into a frame and the pause lets the agent read
    # it alone, so no read ever ends on a frame boundary.
    await c.send_raw(frames[: one // 2])
    t0 = anyio.current_time()
    for i in range(399):
        await c.send_raw(frames[i * one + one // 2 : (i + 1) * one + one // 2])
        await anyio.sleep(0.015)
        if anyio.current_time() - t0 > MID_FRAME_STALL_S + 1:
            break
    else:
        pytest.fail("sent everything before the stall time passed")
    await c.send_raw(frames[(i + 1) * one + one // 2 : (i + 2) * one])  # back on a boundary
    assert (await c.ping()).uptime_s > 0
    assert not c.connection_errors
