"""agentiso-helper: the small root daemon that owns QEMU, volumes and the network.

It never imports mcp, pydantic or platformdirs (docs/architecture.md, "Layout
and packaging"); tests/unit/test_import_boundaries.py enforces it.
"""

__version__ = "0.1.0"
