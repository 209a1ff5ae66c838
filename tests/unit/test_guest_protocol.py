"""Every bound of protocol/guest.py, each tried with a value that breaks it."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agentiso.protocol import guest as gp
from agentiso.protocol.errors import DecodeError, FrameTooLarge, FramingError

MiB = 1024 * 1024
SHA = "0" * 64

# A valid instance of every host -> guest message, as the wire dict.
VALID_REQUESTS: dict[str, dict[str, Any]] = {
    "auth": {"secret": b"s" * 32},
    "ping": {},
    "exec": {"argv": ["ls", "-l"], "cwd": "/root", "env": {"A_1": "x"}, "stdin": b"in",
             "timeout_s": 5.0, "stdout_cap": 10, "stderr_cap": 10},
    "job_start": {"shell": "sleep 1", "ring_bytes": 65536, "timeout_s": 10.0},
    "job_poll": {"job": 1, "stdout_offset": 5, "stderr_offset": 0, "max_bytes": 100,
                 "wait_s": 1.0},
    "job_kill": {"job": 1, "signal": 9},
    "job_list": {},
    "job_forget": {"job": 3},
    "file_read": {"path": "/etc/hostname", "offset": 0, "length": 10},
    "file_write": {"path": "/tmp/x", "data": b"abc", "mode": "overwrite", "offset": 3,
                   "perm": 0o600, "parents": True},
    "file_stat": {"path": "/", "follow_symlinks": True},
    "list_dir": {"path": "/", "limit": 10},
    "file_remove": {"path": "/tmp/x", "recursive": True, "missing_ok": True},
    "make_dir": {"path": "/tmp/d", "perm": 0o700, "parents": True, "exist_ok": True},
    "download": {"path": "/tmp/x", "offset": 0, "length": 100, "chunk_size": 65536,
                 "window": 4},
    "transfer_ack": {"seq": 3},
    "upload_begin": {"path": "/tmp/x", "perm": 0o644, "window": 8},
    "upload_chunk": {"seq": 1, "data": b"x"},
    "upload_end": {"chunks": 1, "sha256": SHA},
    "cancel": {"target": 7},
    "set_hostname": {"hostname": "ws-1.example"},
    "configure_network": {"address": "10.42.0.2", "prefix": 16, "mac": "52:54:00:12:34:56",
                          "gateway": "10.42.0.1", "dns": ["10.42.0.1"], "search": ["lan"],
                          "mtu": 1500},
    "reidentify": {"mac": "52:54:0a:2a:00:09", "address": "10.42.0.9", "prefix": 16,
                   "hostname": "fork-1", "machine_id": "0123456789abcdef" * 2,
                   "entropy": b"e" * 64, "time_ns": 1_800_000_000 * 10**9,
                   "gateway": "10.42.0.1", "dns": ["10.42.0.1"],
                   "old_mac": "52:54:0a:2a:00:02"},
    "sync": {},
    "freeze": {"auto_thaw_s": 10.0},
    "thaw": {},
    "set_env": {"set": {"FOO": "bar"}, "unset": ["BAZ"], "replace": False},
    "shutdown": {"reboot": True},
}

# (message type, field, a value that must be refused, what rule it breaks)
BAD_REQUEST_FIELDS: list[tuple[str, str, Any, str]] = [
    ("ping", "id", -1, "negative id"),
    ("ping", "id", 2**63, "id above int63"),
    ("ping", "id", "1", "id of the wrong type"),
    ("auth", "secret", b"short", "secret below 16 bytes"),
    ("auth", "secret", b"x" * 257, "secret above 256 bytes"),
    ("exec", "argv", [], "empty argv"),
    ("exec", "argv", ["x"] * 4097, "too many args"),
    ("exec", "argv", ["a" * (128 * 1024 + 1)], "arg above MAX_ARG_STRLEN"),
    ("exec", "argv", ["a\x00b"], "NUL in an arg"),
    ("exec", "argv", [1], "non-string arg"),
    ("exec", "cwd", "relative/dir", "relative cwd"),
    ("exec", "cwd", "/a\x00b", "NUL in cwd"),
    ("exec", "cwd", "/" + "a" * 4095, "cwd above PATH_MAX"),
    ("exec", "cwd", "", "empty cwd"),
    ("exec", "env", {"1BAD": "x"}, "env key starting with a digit"),
    ("exec", "env", {"A-B": "x"}, "env key with a dash"),
    ("exec", "env", {"A=B": "x"}, "env key with '='"),
    ("exec", "env", {"": "x"}, "empty env key"),
    ("exec", "env", {"K" * 256: "x"}, "env key too long"),
    ("exec", "env", {"A": "x\x00y"}, "NUL in env value"),
    ("exec", "env", {"A": "v" * (32 * 1024 + 1)}, "env value too long"),
    ("exec", "env", {f"K{i}": "" for i in range(1025)}, "too many env entries"),
    ("exec", "stdin", b"x" * (MiB + 1), "stdin above MAX_CHUNK"),
    ("exec", "timeout_s", 0, "zero timeout"),
    ("exec", "timeout_s", -1.0, "negative timeout"),
    ("exec", "timeout_s", 86401.0, "timeout above a day"),
    ("exec", "timeout_s", float("nan"), "NaN timeout"),
    ("exec", "stdout_cap", -1, "negative cap"),
    ("exec", "stdout_cap", MiB + 1, "inline cap above MAX_INLINE_OUTPUT without stream"),
    ("exec", "stderr_cap", MiB + 1, "inline stderr cap above the limit without stream"),
    ("exec", "window", 0, "zero window"),
    ("exec", "window", 65, "window above MAX_WINDOW"),
    ("exec", "shell", "echo", "both argv and shell"),
    ("exec", "unknown_field", 1, "unknown field"),
    ("job_start", "shell", "a\x00b", "NUL in shell command"),
    ("job_start", "shell", "", "empty shell command"),
    ("job_start", "shell", "x" * (128 * 1024 + 1), "shell command too long"),
    ("job_start", "ring_bytes", 1024, "ring below 4 KiB"),
    ("job_start", "ring_bytes", 16 * MiB + 1, "ring above 16 MiB"),
    ("job_start", "timeout_s", 0.0, "zero job timeout"),
    ("job_poll", "job", 0, "job id 0"),
    ("job_poll", "job", -5, "negative job id"),
    ("job_poll", "stdout_offset", -1, "negative offset"),
    ("job_poll", "stderr_offset", 2**51, "offset above 1 PiB"),
    ("job_poll", "max_bytes", MiB + 1, "poll above MAX_INLINE_OUTPUT"),
    ("job_poll", "wait_s", 301.0, "long-poll above 300 s"),
    ("job_poll", "wait_s", -1.0, "negative long-poll"),
    ("job_kill", "signal", 0, "signal 0"),
    ("job_kill", "signal", 65, "signal above 64"),
    ("file_read", "path", "etc/passwd", "relative path"),
    ("file_read", "path", "/etc/\x00passwd", "NUL in path"),
    ("file_read", "path", "/" + "p" * 4095, "path above PATH_MAX"),
    ("file_read", "path", "", "empty path"),
    ("file_read", "offset", -1, "negative offset"),
    ("file_read", "length", MiB + 1, "read above MAX_CHUNK"),
    ("file_write", "data", b"x" * (MiB + 1), "write above MAX_CHUNK"),
    ("file_write", "mode", "delete", "unknown write mode"),
    ("file_write", "perm", 0o10000, "perm above 07777"),
    ("file_write", "perm", -1, "negative perm"),
    ("list_dir", "limit", 0, "zero list limit"),
    ("list_dir", "limit", 100_001, "list limit above 100000"),
    ("download", "chunk_size", 1024, "chunk below 4 KiB"),
    ("download", "chunk_size", MiB + 1, "chunk above MAX_CHUNK"),
    ("download", "window", 0, "zero download window"),
    ("download", "length", -1, "negative length"),
    ("transfer_ack", "seq", -1, "negative seq"),
    ("upload_begin", "window", 0, "zero upload window"),
    ("upload_begin", "window", 17, "upload window above 16 (16 MiB of 1 MiB chunks)"),
    ("upload_begin", "path", "x", "relative upload path"),
    ("upload_chunk", "seq", 0, "chunk seq 0"),
    ("upload_chunk", "data", b"x" * (MiB + 1), "upload chunk above MAX_CHUNK"),
    ("upload_end", "sha256", "XYZ", "malformed sha256"),
    ("upload_end", "sha256", "A" * 64, "uppercase sha256"),
    ("cancel", "target", -1, "negative cancel target"),
    ("set_hostname", "hostname", "", "empty hostname"),
    ("set_hostname", "hostname", "-lead", "leading dash"),
    ("set_hostname", "hostname", "trail-", "trailing dash"),
    ("set_hostname", "hostname", "a_b", "underscore"),
    ("set_hostname", "hostname", "a b", "space"),
    ("set_hostname", "hostname", "a;reboot", "shell metacharacter"),
    ("set_hostname", "hostname", "a" * 64, "label above 63"),
    ("set_hostname", "hostname", ("a" * 60 + ".") * 4 + "a" * 20, "name above 253"),
    ("set_hostname", "hostname", "a..b", "empty label"),
    ("configure_network", "address", "10.0.0.256", "bad IPv4"),
    ("configure_network", "address", "10.0.0.1/24", "prefix inside address"),
    ("configure_network", "address", "example.com", "host name as address"),
    ("configure_network", "prefix", 33, "IPv4 prefix above 32"),
    ("configure_network", "prefix", -1, "negative prefix"),
    ("configure_network", "mac", "52:54:00:12:34", "short MAC"),
    ("configure_network", "mac", "52-54-00-12-34-56", "MAC with dashes"),
    ("configure_network", "mac", "zz:54:00:12:34:56", "non-hex MAC"),
    ("configure_network", "interface", "eth0", "both mac and interface"),
    ("configure_network", "gateway", "10.42.0.300", "bad gateway"),
    ("configure_network", "dns", ["1.1.1.1"] * 4, "more than 3 DNS servers"),
    ("configure_network", "dns", ["dns.google"], "DNS server not an address"),
    ("configure_network", "search", ["a;b"], "bad search domain"),
    ("configure_network", "search", ["x"] * 7, "more than 6 search domains"),
    ("configure_network", "mtu", 100, "MTU below 576"),
    ("configure_network", "mtu", 70000, "MTU above 65535"),
    ("reidentify", "mac", "52:54:00:12:34", "reidentify: short MAC"),
    ("reidentify", "mac", None, "reidentify: no MAC"),
    ("reidentify", "old_mac", "52-54-00-12-34-56", "reidentify: old MAC with dashes"),
    ("reidentify", "address", "example.com", "reidentify: host name as address"),
    ("reidentify", "address", "10.42.0.0/16", "reidentify: CIDR as address"),
    ("reidentify", "prefix", 33, "reidentify: IPv4 prefix above 32"),
    ("reidentify", "prefix", -1, "reidentify: negative prefix"),
    ("reidentify", "gateway", "10.42.0.300", "reidentify: bad gateway"),
    ("reidentify", "dns", ["1.1.1.1"] * 4, "reidentify: more than 3 DNS servers"),
    ("reidentify", "dns", ["dns.google"], "reidentify: DNS server not an address"),
    ("reidentify", "hostname", "a b", "reidentify: hostname with a space"),
    ("reidentify", "hostname", "-x", "reidentify: hostname with a leading dash"),
    ("reidentify", "hostname", "x" * 64, "reidentify: hostname label above 63"),
    ("reidentify", "machine_id", "0123456789ABCDEF" * 2, "reidentify: upper-case machine-id"),
    ("reidentify", "machine_id", "0" * 31, "reidentify: machine-id of 31 digits"),
    ("reidentify", "machine_id", "0" * 33, "reidentify: machine-id of 33 digits"),
    ("reidentify", "machine_id", "0" * 32, "reidentify: all-zero machine-id"),
    ("reidentify", "machine_id", "g" * 32, "reidentify: non-hex machine-id"),
    ("reidentify", "machine_id", "0123456789abcdef-123456789abcdef", "reidentify: dash"),
    ("reidentify", "entropy", b"e" * 31, "reidentify: entropy below 32 bytes"),
    ("reidentify", "entropy", b"e" * 513, "reidentify: entropy above 512 bytes"),
    ("reidentify", "entropy", "e" * 64, "reidentify: entropy as text"),
    ("reidentify", "time_ns", 0, "reidentify: the epoch"),
    ("reidentify", "time_ns", -1, "reidentify: negative time"),
    ("reidentify", "time_ns", 2**63, "reidentify: time after 2200"),
    ("reidentify", "time_ns", 1.8e18, "reidentify: time as a float"),
    ("freeze", "auto_thaw_s", 0.5, "auto-thaw below 1 s"),
    ("freeze", "auto_thaw_s", 601.0, "auto-thaw above 600 s"),
    ("set_env", "unset", ["BAD KEY"], "bad key to unset"),
    ("set_env", "set", {"X": "\x00"}, "NUL in a default"),
    ("shutdown", "reboot", "yes", "reboot not a bool"),
]


def _wire(tag: str, fields: dict[str, Any], rid: int = 1) -> bytes:
    return msgspec.msgpack.encode({"type": tag, "id": rid, **fields})


@pytest.mark.parametrize("tag", sorted(VALID_REQUESTS))
def test_valid_requests_decode(tag: str) -> None:
    msg = gp.request_codec.decode(_wire(tag, VALID_REQUESTS[tag]))
    assert msg.id == 1
    # and survive a round trip
    assert gp.request_codec.decode(gp.request_codec.encode(msg)) == msg


def test_every_request_type_is_covered() -> None:
    tags = {t.__struct_config__.tag for t in gp.GuestRequest.__args__}  # type: ignore[attr-defined]
    assert tags == set(VALID_REQUESTS)


@pytest.mark.parametrize(("tag", "field", "value", "rule"), BAD_REQUEST_FIELDS,
                         ids=[r[3] for r in BAD_REQUEST_FIELDS])
def test_bad_request_field_is_refused(tag: str, field: str, value: Any, rule: str) -> None:
    fields = {**VALID_REQUESTS[tag], field: value}
    with pytest.raises(DecodeError):
        gp.request_codec.decode(_wire(tag, fields))


@pytest.mark.parametrize(("tag", "fields", "rule"), [
    ("exec", {}, "neither argv nor shell"),
    ("job_start", {"argv": ["a"], "shell": "b"}, "both argv and shell"),
    ("configure_network", {"address": "10.0.0.2", "prefix": 8}, "neither mac nor interface"),
    ("configure_network", {"address": "::1", "prefix": 129, "interface": "eth0"},
     "IPv6 prefix above 128"),
    ("configure_network", {"address": "10.0.0.2", "prefix": 8, "interface": ".."},
     "interface '..'"),
    ("configure_network", {"address": "10.0.0.2", "prefix": 8, "interface": "a/b"},
     "interface with '/'"),
    ("configure_network", {"address": "10.0.0.2", "prefix": 8, "interface": "x" * 16},
     "interface above IFNAMSIZ"),
    ("file_write", {"path": "/x", "data": b"", "offset": 5}, "offset without overwrite"),
    ("download", {"path": "/x", "chunk_size": 1024 * 1024, "window": 17},
     "window * chunk_size above MAX_WINDOW_BYTES"),
    ("nonsense", {}, "unknown message type"),
])
def test_cross_field_rules(tag: str, fields: dict[str, Any], rule: str) -> None:
    with pytest.raises(DecodeError):
        gp.request_codec.decode(_wire(tag, fields))


def test_ipv6_network_config_is_accepted() -> None:
    msg = gp.request_codec.decode(_wire("configure_network", {
        "address": "fd00::2", "prefix": 64, "interface": "eth0", "gateway": "fd00::1",
        "dns": ["fd00::1"]}))
    assert isinstance(msg, gp.ConfigureNetwork)


def test_streaming_exec_allows_big_caps() -> None:
    msg = gp.request_codec.decode(_wire("exec", {"argv": ["x"], "stream": True,
                                                 "stdout_cap": 2**40}))
    assert isinstance(msg, gp.Exec) and msg.stdout_cap == 2**40


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode([1]),
                                  msgspec.msgpack.encode({"type": "ping"}),
                                  msgspec.msgpack.encode({"id": 1})])
def test_garbage_bodies_are_decode_errors(body: bytes) -> None:
    with pytest.raises(DecodeError):
        gp.request_codec.decode(body)


# --- guest -> host: a hostile guest is bounded too -------------------------------------

def _hello(**over: Any) -> dict[str, Any]:
    base = {"version": 1, "agent": "a", "boot": {"init_t0": None, "agent_start": 1.0,
            "listen": 1.0, "hello": 1.0}, "transport": "unix", "max_frame": MiB,
            "max_chunk": MiB, "max_inflight": 8, "session": 1, "pid1": False}
    base.update(over)
    return base


@pytest.mark.parametrize(("tag", "fields"), [
    ("hello", _hello(max_inflight=0)),
    ("hello", _hello(max_frame=2**40)),
    ("hello", _hello(session=0)),
    ("hello", _hello(agent="x" * 257)),
    ("hello", _hello(boot={"init_t0": None, "agent_start": -1.0, "listen": 1.0, "hello": 1.0})),
    ("exec_output", {"seq": 1, "stream": "stdin", "data": b""}),
    ("exec_output", {"seq": 1, "stream": "stdout", "data": b"x" * (MiB + 1)}),
    ("exec_result", {"exit_code": 256, "signal": None, "timed_out": False, "duration_s": 0.0}),
    ("exec_result", {"exit_code": None, "signal": 99, "timed_out": False, "duration_s": 0.0}),
    ("exec_result", {"exit_code": 0, "signal": None, "timed_out": False, "duration_s": 0.0,
                     "stdout": b"x" * (MiB + 1)}),
    ("job_listing", {"jobs": [{"job": 1, "pid": 1, "command": "x", "running": True}] * 4097}),
    ("dir_listing", {"entries": [], "truncated": "no"}),
    ("dir_listing", {"entries": [{"name": "x" * 1025, "kind": "file", "size": 0}],
                     "truncated": False}),
    ("dir_listing", {"entries": [{"name": "x", "kind": "door", "size": 0}], "truncated": False}),
    ("download_end", {"size": 1, "sha256": "nothex"}),
    ("error", {"code": "made_up", "message": "x"}),
    ("error", {"code": "invalid", "message": "x" * 4097}),
    ("file_data", {"data": b"x" * (MiB + 1), "eof": True, "size": 1}),
])
def test_hostile_guest_messages_are_refused(tag: str, fields: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        gp.response_codec.decode(_wire(tag, fields, rid=1))


def test_valid_hello_decodes() -> None:
    msg = gp.response_codec.decode(_wire("hello", _hello(), rid=0))
    assert isinstance(msg, gp.Hello) and msg.session == 1


def test_every_response_fits_a_frame() -> None:
    # The largest legal response (a full inline exec result) fits GUEST_MAX_FRAME.
    big = gp.ExecResult(id=2**62, exit_code=0, signal=None, timed_out=False, duration_s=1.0,
                        stdout=b"x" * gp.MAX_INLINE_OUTPUT, stderr=b"y" * gp.MAX_INLINE_OUTPUT)
    assert len(gp.response_codec.encode(big)) < gp.GUEST_MAX_FRAME
    chunk = gp.UploadChunk(id=2**62, seq=2**62, data=b"x" * gp.MAX_CHUNK)
    assert len(gp.request_codec.encode(chunk)) < gp.GUEST_MAX_FRAME


# --- the guest stream decoder (sync markers + frames) ------------------------------------

def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_stream_decoder_skips_stale_bytes_before_the_marker() -> None:
    d = gp.GuestStreamDecoder()
    stream = b"stale\x00\x00\x00\x09junk" + gp.GUEST_SYNC_MAGIC + _frame(b"one") + _frame(b"")
    assert d.feed(stream) == [None, b"one", b""]


def test_stream_decoder_byte_by_byte_and_resync_midstream() -> None:
    d = gp.GuestStreamDecoder()
    stream = (gp.GUEST_SYNC_MAGIC + _frame(b"a") + gp.GUEST_SYNC_MAGIC + _frame(b"b"))
    out: list[bytes | None] = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
    assert out == [None, b"a", None, b"b"]


def test_stream_decoder_refuses_oversize_frames() -> None:
    d = gp.GuestStreamDecoder(max_frame=10)
    with pytest.raises(FrameTooLarge):
        d.feed(gp.GUEST_SYNC_MAGIC + (11).to_bytes(4, "big"))


def test_stream_decoder_gives_up_scanning_with_bounded_memory() -> None:
    d = gp.GuestStreamDecoder(max_scan=1000)
    for _ in range(9):
        assert d.feed(b"z" * 100) == []
    assert len(d._buf) < len(gp.GUEST_SYNC_MAGIC)
    with pytest.raises(FramingError):
        d.feed(b"z" * 200)


def test_marker_cannot_be_a_frame_header() -> None:
    # Why a marker is recognisable at a frame boundary: as a length it is too big.
    assert int.from_bytes(gp.GUEST_SYNC_MAGIC[:4], "big") > gp.GUEST_MAX_FRAME
    assert int.from_bytes(gp.HOST_SYNC_MAGIC[:4], "big") > gp.GUEST_MAX_FRAME
