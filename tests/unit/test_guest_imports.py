"""The guest agent's cold start: what it must not import.

Under TCG every imported module costs the agent's boot measurably (see
``python -m bench.boot_profile``).  Modules that only an optional path needs
are imported where that path starts: ``hmac`` (OpenSSL's ``_hashlib``
behind it) only for vsock authentication, ``hashlib`` at the first file
transfer, ``secrets`` not at all.
"""

from __future__ import annotations

import subprocess
import sys

NOT_AT_START = ("hmac", "secrets", "hashlib")


def test_the_agent_module_does_not_import_what_only_vsock_needs() -> None:
    code = ("import sys, agentiso.guest.agent\n"
            f"print(sorted(m for m in {NOT_AT_START!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", out


def test_authentication_still_compares_in_constant_time() -> None:
    from agentiso.guest.connection import load_auth, secrets_equal

    load_auth()
    assert "hmac" in sys.modules
    assert secrets_equal(b"a" * 32, b"a" * 32)
    assert not secrets_equal(b"a" * 32, b"a" * 31 + b"b")
    assert not secrets_equal(b"a" * 32, b"a" * 31)
