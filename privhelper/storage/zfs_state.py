"""Dataset layout and ``zfs get`` parsing of the ZFS backend (pure, no I/O).

Layout under the configured root dataset ``R`` (default ``tank/agentiso``)::

    R                       compression=lz4 (or the fallback), inherited below
    R/images/<base>         a base, readonly=on, with one snapshot @base
    R/volumes/<volume>      a clone of R/images/<base>@base or of R/volumes/<v>@<snap>
    R/volumes/<volume>@<s>  the volume's snapshots

A base or volume is a zvol (``type=volume``, QEMU opens /dev/zvol/<dataset>) or,
in file mode, a filesystem holding one raw ``disk.img``.  Each dataset's type
says which, so both kinds can coexist.

Snapshot names the API can produce match :data:`names` rules; a snapshot whose
name starts with ``_`` is *hidden*: it is one of a destroyed volume's snapshots
that ``zfs promote`` handed to a clone which still depends on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: The snapshot of a base that volumes are cloned from.
BASE_SNAPSHOT = "base"
HIDDEN_PREFIX = "_orphan-"
DISK_FILE = "disk.img"
#: User property recording a snapshot's virtual size (file mode has no volsize).
VSIZE_PROP = "org.agentiso:vsize"
PROPS = ("type", "used", "origin", "volsize", "mountpoint", VSIZE_PROP)

Props = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class Datasets:
    root: str

    @property
    def pool(self) -> str:
        return self.root.split("/", 1)[0]

    @property
    def images(self) -> str:
        return f"{self.root}/images"

    @property
    def volumes(self) -> str:
        return f"{self.root}/volumes"

    @property
    def probe(self) -> str:
        # '_' cannot start a resource name: never collides with a volume.
        return f"{self.root}/_zvol-probe"

    def base(self, name: str) -> str:
        return f"{self.images}/{name}"

    def base_origin(self, name: str) -> str:
        return f"{self.base(name)}@{BASE_SNAPSHOT}"

    def volume(self, name: str) -> str:
        return f"{self.volumes}/{name}"

    def snapshot(self, volume: str, snapshot: str) -> str:
        return f"{self.volume(volume)}@{snapshot}"

    def volume_name(self, dataset: str) -> str | None:
        """``R/volumes/<v>`` -> ``v``; anything else -> None."""
        prefix = self.volumes + "/"
        if dataset.startswith(prefix) and "/" not in dataset[len(prefix) :] and "@" not in dataset:
            return dataset[len(prefix) :]
        return None

    def base_name(self, dataset: str) -> str | None:
        prefix = self.images + "/"
        if dataset.startswith(prefix) and "/" not in dataset[len(prefix) :] and "@" not in dataset:
            return dataset[len(prefix) :]
        return None

    def origin_label(self, origin: str) -> str:
        """Render a dataset's ``origin`` property the way the API reports it."""
        ds, _, snap = origin.partition("@")
        if (b := self.base_name(ds)) is not None:
            return f"base:{b}"
        if (v := self.volume_name(ds)) is not None:
            return f"snapshot:{v}@{snap}"
        return "none"


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """``zfs get -H -p -o name,property,value`` output -> {name: {prop: value}}.

    Keeps zfs's order, which lists each dataset's snapshots oldest first.
    """
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, prop, value = parts
        out.setdefault(name, {})[prop] = value
    return out


def snapshots_of(props: Props, dataset: str) -> list[str]:
    """Short names of ``dataset``'s snapshots, oldest first (hidden ones included)."""
    prefix = dataset + "@"
    return [n[len(prefix) :] for n in props if n.startswith(prefix)]


def is_hidden(snapshot: str) -> bool:
    return snapshot.startswith("_")


def clones_of(props: Props, snapshot_full: str) -> list[str]:
    """Datasets whose origin is ``snapshot_full`` (``ds@snap``)."""
    return sorted(n for n, p in props.items() if p.get("origin") == snapshot_full)


def int_prop(props: Props, name: str, prop: str) -> int:
    value = props.get(name, {}).get(prop, "-")
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class Promotion:
    """Before destroying a volume: hide these snapshots, then promote ``clone``."""

    hide: tuple[str, ...]
    clone: str


def plan_promotion(props: Props, dataset: str) -> Promotion | None:
    """Next step to free ``dataset`` of clones, or None when none depend on it.

    ``zfs promote C`` moves every snapshot of the origin up to C's origin
    snapshot into C.  Promoting a clone of the *newest* depended-on snapshot
    moves all depended-on snapshots at once; the visible ones among them are
    renamed to hidden names first, so they neither clash with C's own
    snapshots nor show up as C's.
    """
    snaps = snapshots_of(props, dataset)
    newest = -1
    for i, s in enumerate(snaps):
        if clones_of(props, f"{dataset}@{s}"):
            newest = i
    if newest < 0:
        return None
    clone = clones_of(props, f"{dataset}@{snaps[newest]}")[0]
    hide = tuple(s for s in snaps[: newest + 1] if not is_hidden(s))
    return Promotion(hide, clone)


def later_snapshot_dependents(props: Props, dataset: str, snapshot: str) -> list[str]:
    """Clones of ``dataset``'s snapshots newer than ``snapshot`` (rollback -r would need -R)."""
    snaps = snapshots_of(props, dataset)
    later = snaps[snaps.index(snapshot) + 1 :]
    return sorted(c for s in later for c in clones_of(props, f"{dataset}@{s}"))
