"""agentiso-helper: the small root daemon that owns QEMU, volumes and the network.

It never imports mcp, pydantic or platformdirs (DESIGN §2); a test enforces it.
"""

__version__ = "0.1.0"
