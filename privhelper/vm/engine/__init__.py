"""The VM engine, one part per job:

* :mod:`.types`       settings, configs, statuses, the VM state machine;
* :mod:`.core`        :class:`VmEngine`, the async API the helper calls;
* :mod:`.launcher`    the resolved spec of one VM and its QEMU spawn;
* :mod:`.supervisor`  one VM's process, QMP, console and state (``transition``);
* :mod:`.snapshots`   memory save/restore and live overlay switching;
* :mod:`.adoption`    recorded QEMUs after a helper restart, and orphans;
* :mod:`.hostcheck`   the accelerator decision and ``agentiso-helper check``.

Callers import from here (``from agentiso.privhelper.vm.engine import VmEngine``).
"""

from __future__ import annotations

from ..errors import UnprivilegedImpossible
from .core import VmEngine
from .hostcheck import world_readable_path_problem
from .types import (
    FINISHED,
    TRANSITIONS,
    AdoptReport,
    AgentShutdown,
    CheckResult,
    EngineSettings,
    MemorySaveResult,
    Orphan,
    VmConfig,
    VmEvent,
    VmState,
    VmStatus,
    may_transition,
)

__all__ = [
    "FINISHED",
    "TRANSITIONS",
    "AdoptReport",
    "AgentShutdown",
    "CheckResult",
    "EngineSettings",
    "MemorySaveResult",
    "Orphan",
    "UnprivilegedImpossible",
    "VmConfig",
    "VmEngine",
    "VmEvent",
    "VmState",
    "VmStatus",
    "may_transition",
    "world_readable_path_problem",
]
