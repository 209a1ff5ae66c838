"""``make demo``: a real agent session through MCP, end to end, with timings.

It starts a private ``agentiso-helper`` (its own state directory, socket and
network namespace: nothing on this host's network changes), then runs the real
``agentiso serve`` as an unprivileged user and drives it with the real ``mcp``
client over stdio, exactly as an agent's MCP client would:

create a workspace, run commands, write and read a file, snapshot it, change
the file, restore the snapshot, fork it live into two, serve HTTP from the
guest and fetch it from the host through a port forward, destroy everything.

Each step is printed with its time.  At the end it checks that nothing is left
(no VM, volume, network namespace, TAP, nft table or process) and says so; the
exit status is 0 only if every step succeeded and nothing is left.

Run as root after ``make image``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_env import IMAGES, DemoEnv, demo_env, leftovers

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient

TOOL_TIMEOUT_S = 300.0


class StepFailed(Exception):
    """A tool answered with an error, or not what the step expected."""


def say(text: str) -> None:
    print(text, flush=True)


class Session:
    """The MCP client side: calls tools and prints each step with its time."""

    def __init__(self, mcp: ClientSession) -> None:
        self.mcp = mcp
        self.steps = 0

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.mcp.call_tool(tool, arguments, read_timeout_seconds=TOOL_TIMEOUT_S)
        if result.is_error:
            text = "\n".join(getattr(c, "text", "") for c in result.content)
            raise StepFailed(f"{tool} failed:\n{text}")
        if result.structured_content is None:
            raise StepFailed(f"{tool} returned no structured content")
        return dict(result.structured_content)

    async def sh(self, workspace: str, command: str) -> str:
        r = await self.call("exec", workspace=workspace, command=command)
        if r["exit_code"] != 0:
            raise StepFailed(f"{command!r} in {workspace} exited {r['exit_code']}: {r['stderr']}")
        return " | ".join(str(r["stdout"]).strip().splitlines())

    async def step(self, title: str, body: Callable[[], Awaitable[str | None]]) -> None:
        self.steps += 1
        say(f"\n[{self.steps}] {title}")
        t0 = time.monotonic()
        extra = await body()
        say(f"    ok  {time.monotonic() - t0:6.2f} s{'  ' + extra if extra else ''}")


async def run(env: DemoEnv, errlog: TextIO) -> None:
    """The session; the server's log (structlog JSON on its stderr) goes to ``errlog``."""
    t_all = time.monotonic()
    params = env.serve_params()
    t0 = time.monotonic()
    async with stdio_client(params, errlog=errlog) as (read, write), \
            ClientSession(read, write) as mcp:
        init = await mcp.initialize()
        tools = await mcp.list_tools()
        say(f"MCP server: {init.server_info.name} {init.server_info.version}, "
            f"{len(tools.tools)} tools, as uid {env.user}  ({time.monotonic() - t0:.2f} s)")
        s = Session(mcp)
        await session(s, env)
    say(f"\nthe whole session took {time.monotonic() - t_all:.1f} s")


async def session(s: Session, env: DemoEnv) -> None:
    async def create() -> str:
        ws = await s.call("workspace_create", name="demo", image="minimal")
        return f"state={ws['state']} address={ws['address']} accel={ws['accel']}"

    await s.step("workspace_create: a QEMU microVM with its own disk and address", create)

    async def run_commands() -> None:
        for cmd in ("uname -srm", "hostname", "id -un", "python3 --version"):
            say(f"    $ {cmd:<18} -> {await s.sh('demo', cmd)}")

    await s.step("exec: run commands in it", run_commands)

    async def files() -> None:
        await s.call("file_write", workspace="demo", path="/root/notes.txt",
                     content="version 1: written before the snapshot\n")
        got = await s.call("file_read", workspace="demo", path="/root/notes.txt")
        say("    /root/notes.txt: " + str(got["content"]).strip())

    await s.step("file_write + file_read", files)

    async def snapshot() -> str:
        snap = await s.call("snapshot_create", workspace="demo", name="v1", include_memory=True)
        return f"memory={snap['memory']}"

    await s.step("snapshot_create v1 (disk and memory; the guest freezes for it)", snapshot)

    async def change() -> None:
        say("    " + await s.sh("demo", "echo 'version 2: written after' > /root/notes.txt; "
                                        "cat /root/notes.txt"))

    await s.step("change the file after the snapshot", change)

    async def restore() -> None:
        r = await s.call("snapshot_restore", workspace="demo", name="v1")
        say(f"    restored={r['restored']} state={r['state']} memory={r['memory_restored']}")
        say("    demo: " + await s.sh("demo", "cat /root/notes.txt"))

    await s.step("snapshot_restore v1", restore)

    async def fork() -> str:
        r = await s.call("workspace_fork", workspace="demo", count=2, name_prefix="fork")
        if r["created"] != 2:
            raise StepFailed(f"workspace_fork made {r['created']} of 2: {r}")
        for name in ("demo", "fork-1", "fork-2"):
            say(f"    {name}: " + await s.sh(name, "echo $(hostname) $(ip -o -4 addr show eth0 "
                                                  "| awk '{print $4}'); cat /root/notes.txt"))
        return f"live={r['live']}"

    await s.step("workspace_fork x2 (live: each with its own identity)", fork)

    async def forward() -> str:
        await s.call("file_write", workspace="demo", path="/srv/index.html",
                     content="hello from the demo workspace\n")
        await s.call("exec_background", workspace="demo",
                     command="python3 -m http.server 8000 --directory /srv")
        fwd = await s.call("port_forward", workspace="demo", guest_port=8000)
        port = fwd["host_port"]
        body = ""
        for _ in range(100):
            body = env.host_fetch(port, "index.html")
            if body:
                break
            await anyio.sleep(0.1)
        if body != "hello from the demo workspace\n":
            raise StepFailed(f"curl 127.0.0.1:{port} on the host got {body!r}")
        say(f"    host$ curl http://127.0.0.1:{port}/index.html -> {body.strip()}")
        return f"host port {port} -> guest port 8000"

    await s.step("port_forward: an HTTP server in the guest, fetched from the host", forward)

    async def destroy() -> str:
        for name in ("fork-1", "fork-2", "demo"):
            await s.call("workspace_destroy", workspace=name)
        listed = await s.call("workspace_list")
        return f"workspaces left: {len(listed['workspaces'])}"

    await s.step("workspace_destroy all", destroy)


def helper_holds(env: DemoEnv) -> tuple[int, int]:
    """The VMs and volumes the helper still holds for the demo user."""
    with BlockingHelperClient(str(env.socket), timeout=60) as c:
        vms = c.request(hp.VmList(id=0, owner=env.user))
        vols = c.request(hp.VolumeList(id=0, owner=env.user))
    assert isinstance(vms, hp.Vms) and isinstance(vols, hp.Volumes)
    return len(vms.vms), len(vols.volumes)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def main() -> int:
    if os.geteuid() != 0:
        say("make demo needs root: it starts the agentiso helper (QEMU, TAP, nftables).\n"
            "run it as root (sudo make demo)")
        return 2
    if not (IMAGES / "minimal" / "rootfs.img").exists():
        say("the guest image is missing.\nrun 'make image' first (make demo does)")
        return 2
    say("agentiso demo: a private helper in its own network namespace, the real "
        "'agentiso serve' as an unprivileged user, the real MCP client over stdio.")
    failed: BaseException | None = None
    with demo_env() as env:
        say(f"helper: pid {env.helper.pid}, netns {env.netns}, dir {env.work}")
        try:
            with open(env.work / "serve.log", "w") as errlog:
                anyio.run(run, env, errlog)
        except* StepFailed as group:
            failed = group.exceptions[0]
            say("\nagentiso serve's log, last lines:")
            say(_tail(env.work / "serve.log"))
            say("the helper's log, last lines:")
            say(_tail(env.work / "helper.log"))
        vms, vols = helper_holds(env)
        say(f"helper holds for uid {env.user}: {vms} VMs, {vols} volumes")
        work, netns = env.work, env.netns
    left = leftovers(work, netns)
    say("left behind: " + ("; ".join(left) if left else "nothing"))
    if failed is not None:
        say(f"\nFAILED: {failed}")
        return 1
    return 0 if not left and vms == vols == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
