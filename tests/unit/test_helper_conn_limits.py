"""The helper's connection and buffer limits, pure parts and the accept loop.

* :class:`BufferBudget`: per-uid share and total, root exempt, nothing taken on refusal;
* :func:`connection_refusal`: per-uid and total caps, root always admitted;
* :func:`peek_request_id`: reads only the id, in microseconds whatever the frame;
* :func:`accept_forever`: out of file descriptors, pending connections are
  refused and the server goes on (a real listener in a process whose
  descriptor limit is tiny).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest

from agentiso.privhelper.accept import raise_nofile_limit
from agentiso.privhelper.config import parse_config
from agentiso.privhelper.limits import (
    BufferBudget,
    connection_refusal,
    helper_memory_budget_mib,
    unit_memory_max_mib,
    unit_tasks_max,
)
from agentiso.protocol import helper as hp
from agentiso.protocol.codec import PEEK_MAX_ENTRIES, peek_request_id

MiB = 1 << 20


# --- BufferBudget ---------------------------------------------------------------------


def test_budget_caps_each_uid_and_the_total_and_takes_nothing_on_refusal() -> None:
    b = BufferBudget(total=100, per_uid=60)
    assert b.take(1000, 60) is None
    why = b.take(1000, 1)
    assert why is not None and "uid 1000" in why and "share is 60" in why
    assert b.used_by(1000) == 60 and b.used == 60
    assert b.take(1001, 40) is None
    why = b.take(1002, 1)
    assert why is not None and "budget is 100" in why
    assert b.used == 100 and b.used_by(1002) == 0
    b.give_back(1000, 60)
    assert b.take(1002, 1) is None and b.used == 41


def test_a_full_total_still_admits_small_holdings_within_the_uids_share() -> None:
    """Other users filling the total must not keep a uid from saying hello:
    below the per-connection floor only the uid's own share is checked."""
    b = BufferBudget(total=100, per_uid=60)
    assert b.take(1, 60) is None and b.take(2, 40) is None  # the total is full
    assert b.take(3, 10) is not None
    assert b.take(3, 10, check_total=False) is None and b.used == 110
    why = b.take(1, 1, check_total=False)
    assert why is not None and "share is 60" in why  # its own share still holds


def test_budget_exempts_root_and_rejects_giving_back_what_was_not_taken() -> None:
    b = BufferBudget(total=10, per_uid=5)
    assert b.take(0, 10**9) is None and b.used == 0
    b.give_back(0, 10**9)  # root's bytes were never counted
    assert b.take(7, 5) is None
    with pytest.raises(ValueError, match="more than it holds"):
        b.give_back(7, 6)
    b.give_back(7, 5)
    assert b.used == 0 and b.used_by(7) == 0
    with pytest.raises(ValueError):
        BufferBudget(total=-1, per_uid=1)


# --- connection caps --------------------------------------------------------------------


def test_connection_caps_per_uid_and_in_total_and_root_always_gets_in() -> None:
    assert connection_refusal(1000, 3, 10, max_total=20, max_per_uid=4) is None
    why = connection_refusal(1000, 4, 10, max_total=20, max_per_uid=4)
    assert why is not None and "uid 1000 has 4 connections" in why
    assert "max_connections_per_uid" in why  # says what to do
    why = connection_refusal(1001, 0, 20, max_total=20, max_per_uid=4)
    assert why is not None and "20 user connections" in why
    # Root: whatever is open, by it or by everyone else.
    assert connection_refusal(0, 10**6, 10**6, max_total=1, max_per_uid=1) is None


def test_config_keys_have_bounded_values() -> None:
    cfg = parse_config("[server]\nmax_connections_per_uid = 7\nidle_timeout_s = 2.5\n")
    assert cfg.server.max_connections_per_uid == 7 and cfg.server.idle_timeout_s == 2.5
    for bad in ("max_connections_per_uid = 0", "hello_timeout_s = 0", "buffer_budget_mib = -1",
                "relay_queue_mib = 0", "relay_max_inflight_per_vm = 0"):
        with pytest.raises(Exception, match="server"):
            parse_config(f"[server]\n{bad}\n")


# --- cheap rejection ---------------------------------------------------------------------


def _enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    ("body", "rid"),
    [
        (hp.request_codec.encode(hp.Ping(id=77)), 77),
        (_enc({"type": "nope", "id": 5, "x": [1, 2]}), 5),  # id before the container
        (_enc({"a": 1.5, "b": b"xx", "c": None, "d": "s" * 300, "id": 2**40}), 2**40),
        (_enc({"x": [1], "id": 3}), 0),  # a container before the id: not looked into
        (_enc({**{f"k{i}": i for i in range(PEEK_MAX_ENTRIES)}, "id": 4}), 0),
        (_enc({"id": -1}), 0),
        (_enc({"id": True}), 0),
        (_enc({"id": "7"}), 0),
        (_enc({"id": 2**64 - 1}), 0),
        (_enc([1, 2]), 0),
        (b"", 0),
        (b"\x81\xa2id", 0),  # truncated
        (b"\xdf\xff\xff\xff\xff\xd9", 0),  # a huge map cut short
    ],
)
def test_peek_request_id_reads_only_the_id(body: bytes, rid: int) -> None:
    assert peek_request_id(body) == rid


def test_peek_request_id_costs_microseconds_for_any_4_mib_frame() -> None:
    n = hp.HELPER_MAX_FRAME
    shapes = [
        os.urandom(n),
        b"\xdf\xff\xff\xff\xff" + b"\xa1a\x01" * ((n - 5) // 3),  # a map of a million keys
        _enc({"type": "ping", "x": [[1]] * (n // 3)})[:n],  # a million tiny containers
        b"\x91" * n,  # nested a million deep
    ]
    for body in shapes:
        start = time.perf_counter()
        for _ in range(10):
            assert peek_request_id(body) == 0
        per_call = (time.perf_counter() - start) / 10
        assert per_call < 0.002, f"{per_call * 1000:.2f} ms"  # typically ~20 us


# --- file descriptors ----------------------------------------------------------------------


def test_raise_nofile_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    code = textwrap.dedent(
        """
        import resource
        from agentiso.privhelper.accept import raise_nofile_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
        print(*raise_nofile_limit(65536), *resource.getrlimit(resource.RLIMIT_NOFILE))
        print(*raise_nofile_limit(100))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["4096", "4096", "4096", "4096", "4096", "4096"]  # never lowered
    soft, hard = raise_nofile_limit(1)  # in this process: a no-op
    assert soft >= 1 and hard >= soft


SERVER = textwrap.dedent(
    """
    import resource, sys
    import anyio
    from agentiso.privhelper.accept import accept_forever

    async def hold(stream):
        # Held until the client closes (the test frees descriptors that way).
        async with stream:
            await stream.send(b"hi")
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async def main():
        listener = await anyio.create_unix_listener(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        print("READY", flush=True)
        await accept_forever(listener, hold, b"refused")

    anyio.run(main)
    """
)


def _hello(path: Path) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    got = b""
    while len(got) < 2:
        chunk = s.recv(16)
        if not chunk:
            break
        got += chunk
    _OPEN.append(s)
    return got


_OPEN: list[socket.socket] = []


def test_out_of_descriptors_connections_are_refused_and_the_server_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        answers = [_hello(path) for _ in range(60)]
        served = answers.count(b"hi")
        assert 5 < served < 40, answers
        assert answers[served:] == [b"refused"] * (60 - served)  # refused, not left hanging
        assert proc.poll() is None
        for s in _OPEN[:10]:  # free some descriptors: new clients are served again
            s.close()
        # The server notices the closes a moment later: retry, bounded.
        deadline = time.monotonic() + 10
        while (answer := _hello(path)) != b"hi" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answer == b"hi"
        assert proc.poll() is None
    finally:
        for s in _OPEN:
            s.close()
        _OPEN.clear()
        proc.kill()
        out, err = proc.communicate(timeout=30)
    assert "accept_failed" in out + err and "Too many open files" in out + err


# --- the unit's budget ---------------------------------------------------------------------


def _unit_values(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    repo = Path(__file__).resolve().parents[2]
    for line in (repo / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_the_units_memory_and_task_limits_match_the_default_budget() -> None:
    """MemoryMax and TasksMax cover the helper's budget and its VMs at the
    default host limits, without being far above it (then they cap nothing)."""
    cfg = parse_config("")
    svc = _unit_values("agentiso-helper.service")
    memory_max = svc["MemoryMax"]
    assert memory_max.endswith("M")
    need = unit_memory_max_mib(cfg.limits, cfg.server.buffer_budget_mib)
    assert need <= int(memory_max[:-1]) <= need * 1.1
    tasks = unit_tasks_max(cfg.limits)
    assert tasks <= int(svc["TasksMax"]) <= tasks * 1.1
    assert int(svc["LimitNOFILE"]) >= cfg.server.max_connections * 2
    # The helper's own share is its base plus the buffers it may hold.
    assert helper_memory_budget_mib(cfg.server.buffer_budget_mib) == 256 + 512
