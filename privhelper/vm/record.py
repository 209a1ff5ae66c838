"""The runtime record of one VM, persisted so a restarted helper can adopt it.

One JSON file per VM under ``<state>/vm/records/<name>.json``, written
atomically (temp file, fsync, rename, fsync of the directory): after a crash
the file is either the old or the new record, never a torn one.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..atomicfile import atomic_write
from .procfs import is_same_process
from .spec import VmSpec, check_name

RECORD_VERSION = 1


class VmRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the engine must know about a running QEMU to find it again."""

    name: str
    pid: int
    #: /proc/<pid>/stat start time; a pid whose start time differs is another process.
    pid_start_time: int
    uid: int
    gid: int
    run_dir: str
    qmp_socket: str
    console_socket: str
    channel_socket: str | None
    console_log: str
    stderr_log: str
    spec: VmSpec
    started_at: float
    version: int = RECORD_VERSION
    #: QMP node name of the root disk's top layer (changes with live snapshots).
    top_node: str = "disk0"
    #: Live disk snapshots taken so far (names the next overlay's nodes).
    overlay_generation: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(VmRecord)


def encode_record(rec: VmRecord) -> bytes:
    return _encoder.encode(rec)


def decode_record(data: bytes) -> VmRecord:
    """Decode and check a record; raises ``msgspec.DecodeError``/``ValueError``."""
    rec = _decoder.decode(data)
    if rec.version != RECORD_VERSION:
        raise ValueError(f"record version {rec.version} is not {RECORD_VERSION}")
    check_name(rec.name)
    if rec.spec.name != rec.name:
        raise ValueError("record name and spec name differ")
    return rec


class RecordStore:
    """The directory of VM records."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def ensure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        check_name(name)
        return self.directory / f"{name}.json"

    def save(self, rec: VmRecord) -> None:
        atomic_write(self.path(rec.name), encode_record(rec))

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def load_all(self) -> tuple[list[VmRecord], dict[str, str]]:
        """All readable records, and ``{file name: problem}`` for the unreadable ones."""
        records: list[VmRecord] = []
        bad: dict[str, str] = {}
        if not self.directory.is_dir():
            return records, bad
        for p in sorted(self.directory.glob("*.json")):
            try:
                rec = decode_record(p.read_bytes())
            except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                bad[p.name] = str(e)
                continue
            if p.name != f"{rec.name}.json":
                bad[p.name] = f"file holds the record of {rec.name!r}"
                continue
            records.append(rec)
        return records, bad


def live_pids(directory: Path) -> list[int]:
    """Pids of the recorded QEMUs that still run (the same processes, not
    recycled pids): what a test or the demo must end if it stops early."""
    records, _ = RecordStore(directory).load_all()
    return [r.pid for r in records if is_same_process(r.pid, r.pid_start_time)]
