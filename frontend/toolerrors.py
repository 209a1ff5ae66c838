"""Turning any failure of a tool into an MCP tool error an agent can act on.

Every tool error is two lines: what went wrong, and what to do next.  A
traceback never reaches the client: an unexpected exception is logged (with
its traceback, as JSON on stderr) and the agent is told it was an internal
error and where the details are.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar

import anyio
import structlog
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, InputRequiredResult
from pydantic import ValidationError

from agentiso.protocol import errors as pe

from .errors import ConnectionLost, FrontendError, HelperUnavailable, RequestTimeout

log = structlog.get_logger("agentiso.frontend.tools")

P = ParamSpec("P")
R = TypeVar("R")

class BadArgument(FrontendError):
    """A tool argument that its schema could not refuse (it depends on the
    config or on other arguments).  ``str()`` is the cause, then what to do."""


#: What to do after each typed answer from the helper or a guest agent.
_HINTS: dict[pe.ErrorCode, str] = {
    pe.ErrorCode.INVALID: "Fix the argument named above and call again.",
    pe.ErrorCode.PROTOCOL: "This is a bug in agentiso; retry, and report it if it persists.",
    pe.ErrorCode.VERSION_MISMATCH: "Upgrade agentiso so the frontend and helper match.",
    pe.ErrorCode.PERMISSION_DENIED: "Ask the administrator to add you to the agentiso group.",
    pe.ErrorCode.NOT_FOUND: "Check the name (workspace_list shows your workspaces).",
    pe.ErrorCode.ALREADY_EXISTS: "Choose another name, or destroy the existing one first.",
    pe.ErrorCode.CONFLICT: "Wait for the other operation to finish, or change the state first.",
    pe.ErrorCode.LIMIT_EXCEEDED: "Stop or destroy a workspace, or ask for fewer resources.",
    pe.ErrorCode.TOO_LARGE: "Send less at once (use file_upload for large files).",
    pe.ErrorCode.TIMEOUT: "It took too long; check workspace_logs, then retry "
                          "(with a larger timeout where the tool takes one).",
    pe.ErrorCode.UNAVAILABLE: "The workspace's agent is not reachable; check workspace_info "
                              "and workspace_logs, then retry or restart the workspace.",
    pe.ErrorCode.CANCELLED: "The operation was cancelled; retry it if it is still wanted.",
    pe.ErrorCode.INTERNAL: "This is a bug in agentiso's helper; its log has the details "
                           "(agentiso-helper logs).",
    pe.ErrorCode.GUEST_FAILED: "The step failed inside the workspace; see workspace_logs.",
}


def describe(exc: BaseException, tool: str) -> str:
    """Two lines: the cause, and what to do."""
    if isinstance(exc, HelperUnavailable):
        return f"{exc.reason}\n{_sentence(exc.advice)}"
    if isinstance(exc, ConnectionLost):
        return (f"{exc.message}\nRetry; if it keeps failing check workspace_info and "
                "workspace_logs.")
    if isinstance(exc, RequestTimeout):
        return f"{exc.message}\n{_HINTS[pe.ErrorCode.TIMEOUT]}"
    if isinstance(exc, FrontendError):
        cause = getattr(exc, "cause", None)
        hint = getattr(exc, "hint", None)
        if isinstance(cause, str) and isinstance(hint, str):
            return f"{cause}\n{_sentence(hint)}"
        text = str(exc)
        return text if "\n" in text else f"{text}\nCheck the arguments and retry."
    if isinstance(exc, pe.RemoteError):
        return f"{exc.message}\n{_HINTS.get(exc.code, 'Retry; check workspace_logs.')}"
    if isinstance(exc, pe.LocalProtocolError):
        return (f"the request is too large to send: {exc}\n"
                "Send less at once (file_upload moves files of any size).")
    if isinstance(exc, pe.ProtocolError):
        return (f"agentiso could not talk to the helper or the guest agent: {exc}\n"
                "Retry; if it persists run `agentiso status`.")
    return (f"internal error in the agentiso MCP server ({type(exc).__name__}) during {tool}\n"
            "Retry; the server's log on stderr has the details.")


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return "Retry."
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


class GuestRefused(FrontendError):
    """The guest agent refused a step of a tool (its typed answer, relabelled
    with what to do for that tool)."""

    def __init__(self, cause: str, hint: str) -> None:
        super().__init__(f"{cause}\n{hint}")
        self.cause = cause
        self.hint = hint


#: What to do after the guest agent refuses, by its error code.
_GUEST_HINTS: dict[pe.ErrorCode, str] = {
    pe.ErrorCode.NOT_FOUND: "Check the path (file_list shows what a directory holds).",
    pe.ErrorCode.PERMISSION_DENIED: "The workspace refused it: check the file's permissions "
                                    "and owner (exec runs as root).",
    pe.ErrorCode.ALREADY_EXISTS: "It exists already: choose another path, or allow "
                                 "overwriting.",
    pe.ErrorCode.INVALID: "Fix the argument named above and call again.",
    pe.ErrorCode.TOO_LARGE: "Send less at once (file_upload moves files of any size).",
    pe.ErrorCode.CONFLICT: "The path is in a state that does not allow this (e.g. a "
                           "directory): check it with file_list.",
}


@contextmanager
def guest_errors(tool: str, *, workdir: str | None = None) -> Iterator[None]:
    """Relabel the guest agent's refusals inside a tool with a hint for that
    tool (a guest's not_found is about a path, not about the workspace)."""
    try:
        yield
    except pe.RemoteError as exc:
        if isinstance(exc, FrontendError) or exc.code not in _GUEST_HINTS:
            raise
        hint = _GUEST_HINTS[exc.code]
        if tool == "exec" and exc.code is pe.ErrorCode.NOT_FOUND and workdir:
            hint = f"Check that workdir {workdir} exists (create it with exec mkdir -p)."
        raise GuestRefused(f"in the workspace: {exc.message}", hint) from None
    except pe.LocalProtocolError as exc:
        raise GuestRefused(f"the request is too large to send: {exc}",
                           "Send less at once (file_upload moves files of any size).") from None


@asynccontextmanager
async def guest_call(tool: str) -> AsyncIterator[None]:
    """:func:`guest_errors` for ``async with`` statements."""
    with guest_errors(tool):
        yield


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group wrapped (a group of several stays a group)."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


def tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap a tool: every exception becomes a :class:`ToolError` with
    :func:`describe`'s text (cancellation passes through untouched)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            try:
                return await fn(*args, **kwargs)
            except BaseExceptionGroup as group:
                raise _only(group) from None
        except ToolError:
            raise
        except anyio.get_cancelled_exc_class():
            raise
        except (FrontendError, pe.RemoteError, pe.ProtocolError) as exc:
            log.info("tool_failed", tool=fn.__name__, error=str(exc))
            raise ToolError(describe(exc, fn.__name__)) from None
        except Exception as exc:
            log.exception("tool_crashed", tool=fn.__name__)
            raise ToolError(describe(exc, fn.__name__)) from None

    return wrapper


#: How many of a refusal's failed fields are named (the rest are counted).
_MAX_FIELDS = 3


def describe_refusal(tool: str, exc: ValidationError) -> str:
    """Arguments the input schema refused, as two lines: each failed field
    with why (never its value: it may be huge, or the user's data), and what
    to do."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
             for e in errors[:_MAX_FIELDS]]
    more = len(errors) - _MAX_FIELDS
    if more > 0:
        parts.append(f"and {more} more")
    return (f"the arguments of {tool} were refused by its input schema: {'; '.join(parts)}\n"
            "Fix them as the tool's input schema says (tools/list), then call again.")


class ToolServer(MCPServer[Any]):
    """``MCPServer`` whose schema refusals read like every other tool error.

    The SDK checks arguments against the input schema before the tool runs
    (so :func:`tool_errors` never sees them) and answers with pydantic's
    multi-line report and a documentation URL; this says the same in two lines.
    """

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            refusal = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(refusal, ValidationError):
                raise
            # Chained to the ValidationError, so the SDK still logs field names only.
            raise ToolError(describe_refusal(name, refusal)) from refusal

