"""Adapter: run ``nft -j -f -`` (one transaction per call) and read rulesets back."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from agentiso.protocol.errors import ErrorCode

from .errors import NetSystemError
from .ruleset import TABLE

NFT_TIMEOUT_S = 30.0


class Nft:
    """Thin wrapper around the ``nft`` binary (found on PATH unless given)."""

    def __init__(self, binary: str | None = None) -> None:
        self._binary = binary

    def _bin(self) -> str:
        found = self._binary or shutil.which("nft")
        if not found:
            raise NetSystemError("nft (nftables) is not installed", ErrorCode.UNAVAILABLE)
        return found

    def _run(self, args: list[str], stdin: bytes | None = None) -> bytes:
        try:
            proc = subprocess.run(
                [self._bin(), *args],
                input=stdin,
                capture_output=True,
                timeout=NFT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise NetSystemError(f"nft {' '.join(args)} timed out", ErrorCode.TIMEOUT) from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-2000:]
            raise NetSystemError(f"nft {' '.join(args)} failed ({proc.returncode}): {err}")
        return proc.stdout

    def apply(self, doc: dict[str, Any]) -> None:
        """Commit ``doc`` (nft JSON commands) as one transaction."""
        self._run(["-j", "-f", "-"], json.dumps(doc).encode())

    def check(self, doc: dict[str, Any]) -> None:
        """Let the kernel validate ``doc`` without committing it (``nft -c``)."""
        self._run(["-c", "-j", "-f", "-"], json.dumps(doc).encode())

    def list_tables(self) -> list[tuple[str, str]]:
        """``(family, name)`` of every table."""
        out = json.loads(self._run(["-j", "list", "tables"]) or b'{"nftables": []}')
        return [
            (o["table"]["family"], o["table"]["name"])
            for o in out.get("nftables", [])
            if "table" in o
        ]

    def list_table(self, family: str) -> list[dict[str, Any]]:
        """The objects of our table in ``family`` (empty when it does not exist)."""
        if (family, TABLE) not in self.list_tables():
            return []
        out = json.loads(self._run(["-j", "list", "table", family, TABLE]))
        return [o for o in out.get("nftables", []) if "metainfo" not in o]

    def list_ruleset_json(self) -> bytes:
        """``nft -j list ruleset``: every table of every family, ours included."""
        return self._run(["-j", "list", "ruleset"])

    def list_ruleset_text(self) -> str:
        return self._run(["list", "ruleset"]).decode()
