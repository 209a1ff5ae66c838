"""``python3 -m agentiso.guest``: what /sbin/agentiso-init execs as PID 1."""

import sys

from .agent import main

sys.exit(main())
