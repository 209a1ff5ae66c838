"""Bounded scalar types used in every message.

Every name, size and count that crosses a wire is one of these, so the decoder
itself refuses out-of-range input before any handler runs.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

#: Request ids are chosen by the client; 0 is reserved for connection-level
#: messages (greetings, errors not tied to a request).
RequestId = Annotated[int, Meta(ge=0, le=2**63 - 1)]

#: A resource name: lowercase letters, digits and dashes, starting with a
#: letter or digit, at most 63 characters.  No '/', '.', NUL, spaces or shell
#: metacharacters can get through, so a name is safe in a path, a dataset name,
#: an interface name suffix or a log line.
NAME_PATTERN = r"\A[a-z0-9][a-z0-9-]{0,62}\Z"  # \Z: "$" would allow a trailing newline
Name = Annotated[str, Meta(pattern=NAME_PATTERN, min_length=1, max_length=63)]

#: Free text we show to humans (error messages, version strings): bounded.
ShortText = Annotated[str, Meta(max_length=4096)]
Label = Annotated[str, Meta(max_length=256)]

Uid = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Pid = Annotated[int, Meta(ge=0, le=2**32 - 1)]
ProtocolVersion = Annotated[int, Meta(ge=0, le=65535)]
