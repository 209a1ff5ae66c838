"""Host facts for ``agentiso-helper check`` (see :mod:`.host`)."""
