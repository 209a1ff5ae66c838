"""agentiso-guest: the agent that runs inside each workspace VM.

Imports only the standard library, msgspec and agentiso.protocol: it runs on
the guest's Debian python3 with nothing else installed.
"""

__version__ = "0.1.0"
