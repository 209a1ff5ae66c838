"""Deriving debootstrap's mirror from apt configuration (images/aptsources.py)."""

from __future__ import annotations

import pytest

from images.aptsources import (
    MIRROR_ENV,
    AptSource,
    choose_mirror,
    parse_deb822,
    parse_one_line,
    parse_sources_files,
)
from images.errors import AptSourceError, ImageBuildError

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_expands_suites_and_skips_comments() -> None:
    sources = parse_deb822(DEB822)
    assert AptSource("deb", "http://mirror.example/debian", "bookworm", ("main",)) in sources
    assert [s.suite for s in sources] == ["bookworm", "bookworm-updates", "bookworm-security"]


def test_deb822_disabled_stanza_is_ignored() -> None:
    text = (
        "Enabled: no\nTypes: deb\nURIs: http://off.example/d\nSuites: bookworm\nComponents: main\n"
    )
    assert parse_deb822(text) == []


def test_deb822_multiline_field_and_several_types() -> None:
    text = "Types: deb deb-src\nURIs: http://a.example/d\n http://b.example/d\nSuites: bookworm\n"
    text += "Components: main contrib\n"
    sources = parse_deb822(text)
    assert len(sources) == 4
    assert {s.uri for s in sources} == {"http://a.example/d", "http://b.example/d"}


def test_one_line_with_options_and_comments() -> None:
    text = """
# a comment
deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib # trailing
deb-src http://m.example/debian bookworm main
deb http://broken.example
rubbish line
"""
    sources = parse_one_line(text)
    assert sources == [
        AptSource("deb", "http://m.example/debian", "bookworm", ("main", "contrib")),
        AptSource("deb-src", "http://m.example/debian", "bookworm", ("main",)),
    ]


def test_file_suffix_selects_format_and_disabled_files_are_ignored() -> None:
    files = [
        ("debian.sources", DEB822),
        ("old.list", "deb http://old.example/debian bookworm main\n"),
        ("cloud.list.disabled-by-farm", "deb http://nope.example/ bookworm main\n"),
        ("x.sources.save", DEB822.replace("mirror.example", "nope.example")),
    ]
    uris = {s.uri for s in parse_sources_files(files)}
    assert "http://old.example/debian" in uris
    assert not any("nope" in u for u in uris)


def test_choose_mirror_wants_deb_main_for_the_exact_suite() -> None:
    sources = [
        AptSource("deb-src", "http://src.example/d", "bookworm", ("main",)),
        AptSource("deb", "http://contrib.example/d", "bookworm", ("contrib",)),
        AptSource("deb", "http://upd.example/d", "bookworm-updates", ("main",)),
        AptSource("deb", "cdrom:[Debian]/", "bookworm", ("main",)),
        AptSource("deb", "http://right.example/debian/", "bookworm", ("main",)),
    ]
    assert choose_mirror(sources, "bookworm") == "http://right.example/debian"


def test_no_usable_source_is_a_typed_error() -> None:
    with pytest.raises(AptSourceError, match=MIRROR_ENV):
        choose_mirror([AptSource("deb", "http://x/d", "trixie", ("main",))], "bookworm")
    assert issubclass(AptSourceError, ImageBuildError)


def test_env_override_wins_and_is_validated() -> None:
    sources = parse_deb822(DEB822)
    env = {MIRROR_ENV: "http://override.example/debian/"}
    assert choose_mirror(sources, "bookworm", env) == "http://override.example/debian"
    assert choose_mirror(sources, "bookworm", {MIRROR_ENV: "  "}) == "http://mirror.example/debian"
    for bad in ("ftp://x/debian", "; rm -rf /", "mirror.example/debian"):
        with pytest.raises(AptSourceError):
            choose_mirror(sources, "bookworm", {MIRROR_ENV: bad})
