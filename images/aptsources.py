"""Derive the Debian mirror for debootstrap from the host's apt configuration.

The repository names no mirror host (house rule): the build uses the mirror the
host already trusts.  Both formats apt reads are parsed:

* one-line ``.list`` files (``deb [opts] URI SUITE COMPONENT...``), and
* deb822 ``.sources`` stanzas (``Types:``, ``URIs:``, ``Suites:``, ``Components:``,
  ``Enabled:``).

Everything here is pure: callers read the files and pass their text in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from .errors import AptSourceError

#: Environment variable that overrides the derived mirror.
MIRROR_ENV = "AGENTISO_DEBIAN_MIRROR"

_USABLE_SCHEMES = ("http://", "https://", "file:/")


@dataclasses.dataclass(frozen=True)
class AptSource:
    """One (type, uri, suite, components) source as apt sees it."""

    type: str
    uri: str
    suite: str
    components: tuple[str, ...]


def parse_one_line(text: str) -> list[AptSource]:
    """Parse the one-line format of ``sources.list``; comments and bad lines are skipped."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind = words[0]
        if kind not in ("deb", "deb-src"):
            continue
        rest = words[1:]
        # Options: "[arch=amd64 signed-by=...]" may contain spaces inside the brackets.
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) < 2:
            continue
        uri, suite, *components = rest
        sources.append(AptSource(kind, uri, suite, tuple(components)))
    return sources


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t":
            # Continuation line of a multi-line field.
            if key is not None:
                current[key] += " " + raw.strip()
            continue
        if ":" not in raw:
            continue
        name, value = raw.split(":", 1)
        key = name.strip().lower()
        current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_deb822(text: str) -> list[AptSource]:
    """Parse deb822 ``.sources`` text; disabled stanzas (``Enabled: no``) are skipped."""
    sources: list[AptSource] = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        components = tuple(stanza.get("components", "").split())
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                for suite in stanza.get("suites", "").split():
                    sources.append(AptSource(kind, uri, suite, components))
    return sources


def parse_sources_files(files: Iterable[tuple[str, str]]) -> list[AptSource]:
    """Parse ``(file name, text)`` pairs, choosing the format by the name's suffix.

    Files apt itself ignores (any other suffix, e.g. ``.list.disabled``) are ignored.
    """
    sources: list[AptSource] = []
    for name, text in files:
        if name.endswith(".list"):
            sources.extend(parse_one_line(text))
        elif name.endswith(".sources"):
            sources.extend(parse_deb822(text))
    return sources


def choose_mirror(
    sources: Iterable[AptSource], suite: str, env: Mapping[str, str] | None = None
) -> str:
    """Return the mirror URI debootstrap should use for ``suite``.

    The override in ``env[MIRROR_ENV]`` wins.  Otherwise the first binary (``deb``)
    source of exactly that suite with the ``main`` component and a usable scheme.
    Raises :class:`AptSourceError` when there is none.
    """
    if env is not None and env.get(MIRROR_ENV, "").strip():
        mirror = env[MIRROR_ENV].strip()
        if not mirror.startswith(_USABLE_SCHEMES):
            raise AptSourceError(f"{MIRROR_ENV}={mirror!r} is not an http(s):// or file: URI")
        return mirror.rstrip("/")
    for source in sources:
        if (
            source.type == "deb"
            and source.suite == suite
            and "main" in source.components
            and source.uri.startswith(_USABLE_SCHEMES)
        ):
            return source.uri.rstrip("/")
    raise AptSourceError(
        f"no 'deb' source for suite {suite!r} with component 'main' in the apt configuration;"
        f" set {MIRROR_ENV}"
    )
