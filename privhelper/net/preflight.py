"""What ``agentiso-helper check`` can report about networking on this host.

:func:`check_network` never changes anything; it returns findings, each with a
severity: ``error`` (workspaces cannot get a network), ``info`` (how the host
is set up, e.g. whether br_netfilter is active -- the rules work either way).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from .config import NetSettings
from .links import PROC_SYS_NET, Links
from .tap import TUN_DEVICE


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "info"
    message: str


def check_network(settings: NetSettings, links: Links | None = None) -> list[Finding]:
    out: list[Finding] = []
    if shutil.which("nft") is None:
        out.append(Finding("error", "nft (nftables) is not installed"))
    if not os.path.exists(TUN_DEVICE):
        out.append(Finding("error", f"{TUN_DEVICE} is missing (no TAP devices)"))
    elif not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
        out.append(Finding("error", f"{TUN_DEVICE} is not read-writable by the helper"))
    own = links is None
    links = links or Links()
    try:
        idx = links.index(settings.bridge)
        if idx is None:
            out.append(Finding("info", f"bridge {settings.bridge} will be created on demand"))
        elif links.kind(idx) != "bridge":
            out.append(Finding("error", f"{settings.bridge} exists and is not a bridge"))
        strays = [n for n in links.names() if n.startswith(settings.tap_prefix)]
        if strays:
            out.append(Finding("info", f"links with the TAP prefix: {', '.join(strays)}"))
    except Exception as exc:  # netlink unavailable: report, do not crash the check
        out.append(Finding("error", f"netlink: {exc}"))
    finally:
        if own:
            links.close()
    nf = PROC_SYS_NET / "bridge" / "bridge-nf-call-iptables"
    state = nf.read_text().strip() if nf.exists() else "absent"
    out.append(Finding("info", f"br_netfilter: {state} (isolation does not depend on it)"))
    return out
