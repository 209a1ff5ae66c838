"""Read Debian package metadata: dpkg status and control stanzas (pure)."""

from __future__ import annotations

from .errors import PackageMetadataError


def installed_versions(status_text: str) -> dict[str, str]:
    """Map package name -> version for every stanza whose status is 'install ok installed'."""
    versions: dict[str, str] = {}
    for stanza in status_text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            name, value = line.split(":", 1)
            fields[name.strip().lower()] = value.strip()
        if fields.get("status") == "install ok installed" and "package" in fields:
            versions[fields["package"]] = fields.get("version", "")
    return versions


def parse_control(text: str) -> dict[str, str]:
    """Fields (lower-cased names) of the first stanza of control text (``apt-cache show``)."""
    fields: dict[str, str] = {}
    key: str | None = None
    for line in text.split("\n\n", 1)[0].splitlines():
        if line[:1] in (" ", "\t"):
            if key is not None:
                fields[key] += "\n" + line.strip()
            continue
        if ":" not in line:
            continue
        name, value = line.split(":", 1)
        key = name.strip().lower()
        fields[key] = value.strip()
    return fields


def versioned_kernel_package(meta_fields: dict[str, str]) -> str:
    """The ``linux-image-<release>`` package a kernel metapackage depends on."""
    for dep in meta_fields.get("depends", "").split(","):
        name = dep.strip().split(" ", 1)[0].split(":", 1)[0]
        if name.startswith("linux-image-") and name[len("linux-image-") :][:1].isdigit():
            return name
    depends = meta_fields.get("depends")
    raise PackageMetadataError(f"no versioned linux-image dependency in {depends!r}")
