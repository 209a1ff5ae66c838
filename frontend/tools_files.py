"""The file tools: file_read, file_write, file_edit, file_list, file_upload, file_download."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

from agentiso.protocol import guest as gp

from . import guestfiles
from .hostpaths import HostRoots
from .results import FileContent, FileEdited, FileListing, FileWritten, Transfer
from .toolerrors import BadArgument, guest_call, tool_errors
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

GuestPath = Annotated[str, Field(min_length=1, max_length=4095, pattern=r"^/[^\x00]*$",
                                 description="Absolute path inside the workspace")]
HostPath = Annotated[str, Field(min_length=1, max_length=4095, description=(
    "Path on the host, under one of your configured host roots (relative paths are taken "
    "from the first root)"))]


def register(app: MCPServer[Any], rt: Runtime) -> None:
    def roots() -> HostRoots:
        if rt.roots is None:
            raise BadArgument(
                "no host directories are configured for file transfers\n"
                "Set host_roots in your agentiso config.toml (or start agentiso serve "
                "from the directory to share)."
            )
        return rt.roots

    def inline_limit() -> int:
        return rt.config.limits.max_inline_file_bytes

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True), description=(
        "Read a file in the workspace. Text: `offset` and `limit` count lines (from 0). "
        "Binary: set encoding to base64, then `offset` and `limit` count bytes. When "
        "has_more, call again with offset=next_offset."))
    @tool_errors
    async def file_read(
        workspace: WorkspaceRef,
        path: GuestPath,
        offset: Annotated[int, Field(ge=0, le=2**50, description="First line/byte")] = 0,
        limit: Annotated[int, Field(ge=1, le=1_000_000, description="Lines (text) or bytes "
                                    "(base64) to return at most")] | None = None,
        encoding: Literal["utf-8", "base64"] = "utf-8",
    ) -> FileContent:
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("file_read"):
            if encoding == "base64":
                n = min(limit or inline_limit(), inline_limit())
                return await guestfiles.read_bytes(g, path, offset, n)
            return await guestfiles.read_text(g, path, offset, limit or 2000, inline_limit())

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Write a file in the workspace (replacing it atomically, or appending). Content is "
        "text, or base64 with encoding base64. Up to 4 MiB per call by default: use "
        "file_upload for larger files."))
    @tool_errors
    async def file_write(
        workspace: WorkspaceRef,
        path: GuestPath,
        content: Annotated[str, Field(max_length=24 * 1024 * 1024)],
        mode: Annotated[str, Field(pattern=r"^(0o?)?[0-7]{3,4}$", description=(
            "Permissions, octal (e.g. 644, 0755); default: the file's own, or 644 "
            "for a new file"))] | None = None,
        encoding: Literal["utf-8", "base64"] = "utf-8",
        append: Annotated[bool, Field(description="Append instead of replacing")] = False,
        create_only: Annotated[bool, Field(description="Fail if the file exists")] = False,
        make_parents: Annotated[bool, Field(description="Create missing directories")] = True,
    ) -> FileWritten:
        data = guestfiles.decode_content(content, encoding)
        if len(data) > inline_limit():
            raise BadArgument(f"content is {len(data)} bytes, above the {inline_limit()}-"
                                  "byte limit of one call\nUse file_upload for large files.")
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("file_write"):
            perm = guestfiles.parse_mode(mode) if mode else await guestfiles.mode_of(g, path)
            return await guestfiles.write(g, path, data, perm=perm, append=append,
                                          exclusive=create_only, parents=make_parents)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Replace an exact piece of text in a workspace file. Fails (changing nothing) when "
        "old_text is not found, or is found several times unless replace_all."))
    @tool_errors
    async def file_edit(
        workspace: WorkspaceRef,
        path: GuestPath,
        old_text: Annotated[str, Field(min_length=1, max_length=1024 * 1024)],
        new_text: Annotated[str, Field(max_length=4 * 1024 * 1024)],
        replace_all: bool = False,
    ) -> FileEdited:
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("file_edit"):
            return await guestfiles.edit(g, path, old_text, new_text, replace_all,
                                         inline_limit())

    @app.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True), description=(
        "List a directory in the workspace: names, kinds and sizes."))
    @tool_errors
    async def file_list(
        workspace: WorkspaceRef,
        path: GuestPath = "/root",
        limit: Annotated[int, Field(ge=1, le=100_000)] = 1000,
    ) -> FileListing:
        rec = rt.ws.owned(workspace)
        async with rt.ws.guest(rec) as g, guest_call("file_list"):
            return await guestfiles.listing(g, path, limit)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True), description=(
        "Copy a host file into the workspace, streamed (any size). The host file must be "
        "under your configured host roots; the guest file appears atomically."))
    @tool_errors
    async def file_upload(
        workspace: WorkspaceRef,
        host_path: HostPath,
        guest_path: GuestPath,
        mode: Annotated[str, Field(pattern=r"^(0o?)?[0-7]{3,4}$")] = "644",
        overwrite: bool = True,
    ) -> Transfer:
        rec = rt.ws.owned(workspace)
        perm = guestfiles.parse_mode(mode)
        resolved = roots().resolve(host_path).path
        f, _size = roots().open_read(host_path)
        t0 = time.monotonic()
        try:
            async def chunks() -> AsyncIterator[bytes]:
                while data := await anyio.to_thread.run_sync(f.read, gp.DEFAULT_CHUNK * 4):
                    yield data

            async with rt.ws.guest(rec) as g, guest_call("file_upload"):
                r = await g.upload(guest_path, chunks(), perm=perm, parents=True,
                                   exclusive=not overwrite, window=16)
        finally:
            f.close()
        return Transfer(workspace=rec.name, guest_path=guest_path, host_path=str(resolved),
                        bytes=r.size, sha256=r.sha256,
                        duration_secs=round(time.monotonic() - t0, 6))

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True), description=(
        "Copy a workspace file to the host, streamed (any size). The host path must be under "
        "your configured host roots; the host file appears only when complete."))
    @tool_errors
    async def file_download(
        workspace: WorkspaceRef,
        guest_path: GuestPath,
        host_path: HostPath,
        overwrite: bool = False,
    ) -> Transfer:
        rec = rt.ws.owned(workspace)
        t0 = time.monotonic()
        with roots().writer(host_path, overwrite=overwrite) as w:
            async def write(data: bytes) -> None:
                await anyio.to_thread.run_sync(w.write, data)

            async with rt.ws.guest(rec) as g, guest_call("file_download"):
                # At most the size the file has now: a guest cannot stream forever
                # into the user's disk by growing it (or by lying).
                size = (await g.stat(guest_path, follow_symlinks=True)).size
                r = await g.download(guest_path, write, length=size,
                                     chunk_size=gp.MAX_CHUNK, window=8)
            # commit() fsyncs: keep it off the event loop (the exit then has nothing to do).
            await anyio.to_thread.run_sync(w.commit)
            resolved = w.path
        return Transfer(workspace=rec.name, guest_path=guest_path, host_path=str(resolved),
                        bytes=r.size, sha256=r.sha256,
                        duration_secs=round(time.monotonic() - t0, 6))
