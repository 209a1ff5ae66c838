"""Files in a workspace for the ``file_*`` tools: the logic, apart from MCP.

The pure parts (line windows, exact-match edits, permission text) are plain
functions, tested without a guest; the rest drives a
:class:`~.guest_client.GuestClient` in bounded pieces (at most one protocol
chunk per message, a credit window for uploads), so no call holds a whole
large file in memory except where its result must carry it.
"""

from __future__ import annotations

import base64
import binascii
import re

from agentiso.protocol import errors as pe
from agentiso.protocol import guest as gp

from .errors import FrontendError
from .guest_client import GuestClient
from .results import FileContent, FileEdited, FileEntry, FileListing, FileWritten


class FileToolError(FrontendError):
    """A file tool's input or the file does not allow the operation.

    ``str()`` is one line of cause and one of what to do."""


# --- pure parts ------------------------------------------------------------------------


def parse_mode(text: str) -> int:
    """``"644"``, ``"0644"`` or ``"0o644"`` as permission bits."""
    m = re.fullmatch(r"(?:0o?)?([0-7]{3,4})", text.strip())
    if m is None:
        raise FileToolError(f"mode {text!r} is not octal permissions\n"
                            "Give it like \"644\" or \"0755\".")
    return int(m.group(1), 8)


def decode_content(content: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise FileToolError("content is not valid base64\n"
                            "Send base64 text, or use encoding \"utf-8\" for text.") from None


class LineWindow:
    """Collects lines ``offset .. offset+limit`` from a byte stream fed in
    pieces, keeping at most ``max_bytes`` of them (sans-io)."""

    def __init__(self, offset: int, limit: int, max_bytes: int) -> None:
        self.offset = offset
        self.limit = limit
        self.max_bytes = max_bytes
        self.line = 0  # index of the line the next byte belongs to
        self.kept = bytearray()
        self.count = 0  # complete or partial lines kept
        self.full = False  # stopped before the end of the file

    def feed(self, data: bytes) -> bool:
        """Feed the next bytes; returns False once nothing more is wanted."""
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            if self.line >= self.offset + self.limit:
                self.full = True
                return False
            if self.line >= self.offset:
                piece = data[pos:end]
                if len(self.kept) + len(piece) > self.max_bytes:
                    if b"\n" not in self.kept:  # one line longer than the budget: its start
                        self.kept += piece[: self.max_bytes - len(self.kept)]
                        self.count = 1
                    elif not self.kept.endswith(b"\n"):
                        # A line begun in an earlier piece: drop its start, so the
                        # next call (from next_offset) returns it whole.
                        del self.kept[self.kept.rfind(b"\n") + 1 :]
                        self.count -= 1
                    self.full = True
                    return False
                if not self.kept or self.kept.endswith(b"\n"):
                    self.count += 1
                self.kept += piece
            if nl >= 0:
                self.line += 1
            pos = end
        return True


def apply_edit(text: str, old: str, new: str, replace_all: bool, path: str) -> tuple[str, int]:
    """Replace exact ``old`` with ``new``: exactly once, or every occurrence
    with ``replace_all``.  Zero matches, or several without ``replace_all``,
    is refused with what to do."""
    if not old:
        raise FileToolError("old_text is empty\nGive the exact text to replace.")
    count = text.count(old)
    if count == 0:
        raise FileToolError(f"old_text was not found in {path}\n"
                            "Read the file (file_read) and copy the text exactly, "
                            "whitespace included.")
    if count > 1 and not replace_all:
        raise FileToolError(f"old_text occurs {count} times in {path}\n"
                            "Add surrounding lines to make it unique, or set replace_all.")
    return text.replace(old, new), count


# --- guest operations ------------------------------------------------------------------


async def read_text(guest: GuestClient, path: str, offset: int, limit: int,
                    max_bytes: int) -> FileContent:
    window = LineWindow(offset, limit, max_bytes)
    pos = 0
    size = 0
    while True:
        chunk = await guest.read_file(path, offset=pos, length=gp.MAX_CHUNK)
        size = chunk.size
        pos += len(chunk.data)
        if not window.feed(chunk.data) or chunk.eof or not chunk.data:
            break
    data = bytes(window.kept)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileToolError(f"{path} is not UTF-8 text\n"
                            "Read it with encoding \"base64\".") from None
    has_more = window.full
    return FileContent(path=path, content=text, encoding="utf-8", size=size, offset=offset,
                       count=window.count, has_more=has_more,
                       next_offset=offset + window.count)


async def read_bytes(guest: GuestClient, path: str, offset: int, limit: int) -> FileContent:
    out = bytearray()
    pos = offset
    size = 0
    eof = False
    while len(out) < limit:
        chunk = await guest.read_file(path, offset=pos, length=min(gp.MAX_CHUNK, limit - len(out)))
        size = chunk.size
        out += chunk.data
        pos += len(chunk.data)
        if chunk.eof or not chunk.data:
            eof = True
            break
    if not eof and pos >= size:
        eof = True
    return FileContent(path=path, content=base64.b64encode(bytes(out)).decode("ascii"),
                       encoding="base64", size=size, offset=offset, count=len(out),
                       has_more=not eof, next_offset=pos)


async def mode_of(guest: GuestClient, path: str, default: int = 0o644) -> int:
    """The permissions of ``path`` if it exists (a rewrite keeps them), else ``default``."""
    try:
        return (await guest.stat(path, follow_symlinks=True)).perm
    except pe.NotFound:
        return default


async def write(guest: GuestClient, path: str, data: bytes, *, perm: int, append: bool,
                exclusive: bool, parents: bool) -> FileWritten:
    if append:
        for i in range(0, max(len(data), 1), gp.MAX_CHUNK):
            await guest.write_file(path, data[i : i + gp.MAX_CHUNK], mode="append", perm=perm,
                                   parents=parents)
    else:
        # An upload lands atomically: readers never see a half-written file.
        await guest.upload_bytes(data, path, perm=perm, parents=parents, exclusive=exclusive)
    return FileWritten(path=path, bytes_written=len(data), mode=f"{perm:04o}")


async def edit(guest: GuestClient, path: str, old: str, new: str, replace_all: bool,
               max_bytes: int) -> FileEdited:
    st = await guest.stat(path, follow_symlinks=False)
    if st.kind == "symlink":
        raise FileToolError(f"{path} is a symbolic link (to {st.symlink_target})\n"
                            "Edit the file it points to.")
    if st.kind != "file":
        raise FileToolError(f"{path} is a {st.kind}, not a regular file\n"
                            "Edit a regular file.")
    if st.size > max_bytes:
        raise FileToolError(f"{path} is {st.size} bytes, above the {max_bytes}-byte edit limit\n"
                            "Edit it with exec (e.g. sed), or raise limits.max_inline_file_bytes.")
    content = await read_bytes(guest, path, 0, st.size + 1)
    try:
        text = base64.b64decode(content.content).decode("utf-8")
    except UnicodeDecodeError:
        raise FileToolError(f"{path} is not UTF-8 text\nEdit binary files with exec.") from None
    count = text.count(old) if old else 0
    grown = len(text.encode()) + count * (len(new.encode()) - len(old.encode()))
    if count and replace_all and grown > max_bytes:
        raise FileToolError(f"the edit would make {path} {grown} bytes, above the {max_bytes}-"
                            "byte limit\nReplace fewer occurrences, or edit with exec.")
    updated, count = apply_edit(text, old, new, replace_all, path)
    now = await guest.stat(path, follow_symlinks=False)
    if (now.size, now.mtime_ns) != (st.size, st.mtime_ns):
        raise FileToolError(f"{path} changed while it was being edited\n"
                            "Read it again and retry the edit.")
    await guest.upload_bytes(updated.encode("utf-8"), path, perm=st.perm)
    return FileEdited(path=path, replacements=count)


async def listing(guest: GuestClient, path: str, limit: int) -> FileListing:
    d = await guest.list_dir(path, limit=limit)
    return FileListing(
        path=path,
        entries=[FileEntry(name=e.name, kind=e.kind, size=e.size) for e in d.entries],
        truncated=d.truncated,
    )
