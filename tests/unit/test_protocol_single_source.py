"""The guest channel's contract is written once, in protocol/: no other package
spells its constants or parses its byte stream by hand.

Sites still being ported are listed in PORTING with the reason; the list can
only shrink: an entry whose duplicate is gone fails the test until removed.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("guest", "privhelper", "frontend", "images")

#: What only protocol/ may spell: the agent port name, the fw_cfg entry, the
#: sync markers, and a hand-made frame header parse.
DUPLICATES = {
    "agent port name": re.compile(r"[\"']org\.agentiso\.agent\.0[\"']"),
    "fw_cfg secret entry": re.compile(r"[\"']opt/org\.agentiso/secret"),
    "sync marker": re.compile(r"AGENTISO-(GUEST|HOST)-SYNC"),
    "vsock port": re.compile(r"^\s*\w*PORT\w*\s*=\s*5000\b", re.M),
    "frame header parse": re.compile(r"HEADER\.unpack|from_bytes\(\w+\[:4\]"),
}

#: (file, what) pairs not ported yet, and who ports them.
PORTING: dict[tuple[str, str], str] = {}


def _hits() -> set[tuple[str, str]]:
    found = set()
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            for what, pattern in DUPLICATES.items():
                if pattern.search(text):
                    found.add((str(path.relative_to(REPO)), what))
    return found


HITS = _hits()


def test_no_new_copy_of_the_guest_channel_contract() -> None:
    new = sorted(HITS - PORTING.keys())
    assert not new, f"defined in protocol/ (guest_constants, guest_stream): {new}"


def test_the_porting_list_only_shrinks() -> None:
    ported = sorted(site for site in PORTING if site not in HITS)
    assert not ported, f"{ported} are ported: remove them from PORTING"
