"""Network configuration as data (pure): which interface, which ``ip`` commands,
what /etc/resolv.conf says.  :mod:`agentiso.guest.system` runs them."""

from __future__ import annotations

import os

from agentiso.protocol import guest as gp


def find_interface_by_mac(mac: str, sys_class_net: str = "/sys/class/net") -> str | None:
    want = mac.lower()
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(sys_class_net, name, "address")) as f:
                if f.read().strip().lower() == want:
                    return name
        except OSError:
            continue
    return None


def ip_commands(req: gp.ConfigureNetwork, ifname: str) -> list[list[str]]:
    """The ``ip`` invocations that give ``ifname`` the requested configuration.

    Idempotent: addresses are flushed first and the default route replaced, so
    running them twice (e.g. after a restore) gives the same result."""
    cmds: list[list[str]] = []
    if req.mtu is not None:
        cmds.append(["ip", "link", "set", "dev", ifname, "mtu", str(req.mtu)])
    cmds.append(["ip", "link", "set", "dev", ifname, "up"])
    cmds.append(["ip", "addr", "flush", "dev", ifname])
    cmds.append(["ip", "addr", "add", f"{req.address}/{req.prefix}", "dev", ifname])
    if req.gateway is not None:
        cmds.append(["ip", "route", "replace", "default", "via", req.gateway, "dev", ifname])
    return cmds


def ip_batch(cmds: list[list[str]]) -> bytes:
    """``ip -batch -`` input that runs ``cmds`` (each ``["ip", ...]``) in one
    process: under TCG every exec of ``ip`` costs tens of milliseconds.  ip
    stops at the first command that fails (the rest do not run), as running
    them one by one did.  ValueError for anything but plain words (a
    newline in an argument would be another command)."""
    lines = []
    for argv in cmds:
        if argv[:1] != ["ip"] or len(argv) < 2:
            raise ValueError(f"not an ip command: {argv!r}")
        for arg in argv[1:]:
            if not arg or any(c.isspace() or c in "\"'#\\" for c in arg):
                raise ValueError(f"ip argument {arg!r} is not a plain word")
        lines.append(" ".join(argv[1:]))
    return ("\n".join(lines) + "\n").encode()


def resolv_conf(dns: list[str], search: list[str]) -> str:
    lines = ["# written by agentiso-guest"]
    if search:
        lines.append("search " + " ".join(search))
    lines += [f"nameserver {server}" for server in dns]
    return "\n".join(lines) + "\n"


def hosts_with_hostname(hosts: str, hostname: str) -> str:
    """/etc/hosts text with ``127.0.1.1 <hostname>`` as the only 127.0.1.1 line."""
    kept = [ln for ln in hosts.splitlines() if ln.split()[:1] != ["127.0.1.1"]]
    if not any(ln.split()[:1] == ["127.0.0.1"] for ln in kept):
        kept.insert(0, "127.0.0.1 localhost")
    short = hostname.split(".")[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    kept.append(f"127.0.1.1 {names}")
    return "\n".join(kept) + "\n"
