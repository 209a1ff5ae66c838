"""agentiso: the unprivileged MCP frontend (docs/frontend.md).

Runs as the user; never imports agentiso.privhelper and never runs qemu, zfs,
nft or ip itself: it only speaks the helper protocol.
"""

__version__ = "0.1.0"
