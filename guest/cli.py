"""``agentiso-guest``: entry point of the in-VM agent."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .agent import main as agent_main

    return agent_main(argv)


if __name__ == "__main__":
    sys.exit(main())
