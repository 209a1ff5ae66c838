"""Exceptions of the frontend.  :class:`FrontendError` is the root.

Typed answers from the helper or a guest arrive as
:class:`agentiso.protocol.errors.RemoteError` subclasses; what the frontend
itself detects (helper unreachable, bad user input) derives from this root.
"""

from __future__ import annotations


class FrontendError(Exception):
    """Root of the frontend's own exceptions."""
