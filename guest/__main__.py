"""``python3 -m agentiso.guest``: what /sbin/agentiso-init execs as PID 1."""

import sys

# The agent never speaks TLS; without this asyncio imports ssl, a fifth of a
# second of boot time under TCG.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from .agent import main  # noqa: E402

sys.exit(main())
