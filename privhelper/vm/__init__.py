"""The helper's VM engine: QEMU microVMs built, launched, watched and adopted.

Layout (I/O at the edges, logic pure):

* :mod:`.spec`       typed, validated description of one QEMU instance;
* :mod:`.cmdline`    pure ``VmSpec -> argv`` builder;
* :mod:`.record`     the per-VM runtime record persisted atomically (adoption);
* :mod:`.procfs`     /proc parsing (pid start time, argv, orphan scan);
* :mod:`.uids`       per-VM unprivileged uid allocation (pure);
* :mod:`.boundedlog` size-capped rotating log files (console, stderr);
* :mod:`.launch`     spawning QEMU as an unprivileged uid with passed fds;
* :mod:`.qmp`        QMP adapter with per-command timeouts;
* :mod:`.accel`      the KVM-or-TCG probe;
* :mod:`.engine`     :class:`VmEngine`, the async API the server calls (a package:
  types, core, launcher, supervisor, snapshots, adoption, hostcheck).
"""
