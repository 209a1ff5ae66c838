"""``agentiso serve`` keeps stdout for MCP alone and logs JSON on stderr.

The ``mcp`` client drops stdout lines that are not JSON-RPC (it only logs
them), so the tests that drive the server through it would not notice a
stray ``print``.  Here the server runs as a plain subprocess, driven with raw
JSON-RPC lines, and every line of both streams is checked.  No VM and no
helper are needed: the config names a helper socket that does not exist, so
the tool call fails the way it does without a helper, and logs while doing so.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

from tests.support.mcp_client import serve_params

#: Long enough for a loaded machine to start the interpreter and import the SDK.
ANSWER_TIMEOUT = 60.0


def _lines(stream: IO[str], into: list[str], fresh: queue.Queue[str]) -> None:
    for line in stream:
        into.append(line)
        fresh.put(line)


class _Server:
    """``agentiso serve`` on pipes; every line it writes is kept."""

    def __init__(self, config: Path) -> None:
        params = serve_params(config)
        self.proc = subprocess.Popen(
            [params.command, *params.args], env=params.env, cwd=params.cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._answers: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=_lines, args=(self.proc.stdout, self.stdout, self._answers),
                             daemon=True),
            threading.Thread(target=_lines, args=(self.proc.stderr, self.stderr, queue.Queue()),
                             daemon=True),
        ]
        for t in self._readers:
            t.start()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def ask(self, id_: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request; return its response (notifications before it are skipped)."""
        self.send({"jsonrpc": "2.0", "id": id_, "method": method,
                   **({"params": params} if params is not None else {})})
        while True:
            line = self._answers.get(timeout=ANSWER_TIMEOUT)
            message = json.loads(line)
            if message.get("id") == id_:
                return dict(message)

    def close(self) -> int:
        """End stdin (the client leaves); the server must exit by itself."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=ANSWER_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self._readers:
                t.join(timeout=10)


def test_stdout_is_mcp_only_and_logs_are_json_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'helper_socket = "{tmp_path}/missing.sock"\n'
                      f'state_dir = "{tmp_path / "state"}"\n')
    server = _Server(config)
    try:
        init = server.ask(1, "initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "stdio-test", "version": "1"}})
        assert init["result"]["serverInfo"]["name"], init
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        listed = server.ask(2, "tools/list")
        assert any(t["name"] == "workspace_list" for t in listed["result"]["tools"])
        called = server.ask(3, "tools/call", {"name": "workspace_list", "arguments": {}})
        assert called["result"]["isError"] is True
        assert "helper" in called["result"]["content"][0]["text"]
    finally:
        rc = server.close()
    assert rc == 0, (rc, server.stderr[-5:])

    for line in server.stdout:
        message = json.loads(line)  # a line that is not JSON fails here
        assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", line
    assert len(server.stdout) >= 3
    events = []
    for line in server.stderr:
        record = json.loads(line)
        assert isinstance(record, dict) and {"event", "level"} <= record.keys(), line
        events.append(record["event"])
    # The helper's failure was logged, on stderr, as JSON.
    assert any("helper" in line for line in server.stderr), events
