"""The persistent network state: one JSON file, replaced atomically.

A save writes a temporary file in the same directory, fsyncs it, renames it
over the old one and fsyncs the directory, so a crash leaves either the old or
the new state, never a torn one.  A file that cannot be decoded raises
:class:`StateCorrupt` rather than being taken as empty: silently forgetting
allocations would hand one address to two workspaces.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..atomicfile import atomic_write
from .errors import InvalidNetInput, StateCorrupt
from .model import STATE_VERSION, NetState

STATE_FILE_NAME = "net.json"


def load_state(path: Path) -> NetState:
    """Read the state; a missing file is the empty state."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return NetState()
    except OSError as exc:
        raise StateCorrupt(f"{path}: cannot read: {exc.strerror}") from None
    try:
        state = msgspec.json.decode(data, type=NetState)
    except msgspec.DecodeError as exc:
        raise StateCorrupt(f"{path}: not a valid network state: {exc}") from None
    if state.version != STATE_VERSION:
        raise StateCorrupt(f"{path}: state version {state.version}, expected {STATE_VERSION}")
    return state


def save_state(path: Path, state: NetState) -> None:
    """Atomically replace ``path`` with ``state`` (mode 0600).

    Raises :class:`InvalidNetInput` (and writes nothing) for a state that would
    not decode back.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = msgspec.json.format(msgspec.json.encode(state), indent=1)
    # Structs built in code skip the decoder's constraints: refuse to write a
    # state that load_state would then reject after a restart.
    try:
        msgspec.json.decode(data, type=NetState)
    except msgspec.ValidationError as exc:
        raise InvalidNetInput(f"state would not load back: {exc}") from None
    atomic_write(path, data)
