"""``make install`` / ``make uninstall``: agentiso system-wide, and back out.

Install puts down (paths under ``--destdir``, empty for the real root):

* ``PREFIX`` (default /opt/agentiso): a virtualenv holding exactly the hashed
  versions of ``requirements.lock`` and the agentiso wheel;
* ``/usr/local/bin/agentiso`` and ``agentiso-helper``: symlinks into it;
* the systemd socket and service (``/etc/systemd/system``), the sysusers
  group (``/etc/sysusers.d``), the polkit policy and rules;
* ``/etc/agentiso/helper.toml`` with every key commented (made from the
  helper's code by helper_toml.py), unless the file exists already;
* the guest images given with ``--image`` under /var/lib/agentiso/images.

Every file, link and directory it made is recorded, with each file's hash,
in ``PREFIX/install-manifest.json``.  Uninstall removes exactly those: a file
changed since (an edited helper.toml) is kept and named, and so is a directory
that is not empty (workspaces' state).  Nothing else is touched.

On the real root with systemd running, install also creates the group
(systemd-sysusers) and enables the socket; uninstall disables it first.
It ends by printing the ``mcpServers`` entry for an MCP client.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PREFIX = "/opt/agentiso"
MANIFEST = "install-manifest.json"
COMMANDS = ("agentiso", "agentiso-helper")
UNITS = ("agentiso-helper.socket", "agentiso-helper.service")
GROUP = "agentiso"


class InstallError(Exception):
    """Two lines: what failed, and what to do."""


@dataclass(frozen=True)
class Item:
    """One thing install puts down, at its path on the target root."""

    path: str
    kind: str  # "file", "symlink", "dir" or "tree"
    source: Path | None = None  # file: copied from here ...
    content: bytes | None = None  # ... or written with this
    target: str = ""  # symlink: points here
    mode: int = 0o644


def plan(prefix: str, helper_toml: bytes, images: list[Path]) -> list[Item]:
    """What install puts down, in order (pure: paths are the target root's)."""
    items = [Item(prefix, "tree")]
    items += [Item("/usr/local/bin/" + c, "symlink", target=f"{prefix}/bin/{c}") for c in COMMANDS]
    for unit in UNITS:
        items.append(Item(f"/etc/systemd/system/{unit}", "file", source=REPO / "systemd" / unit))
    items += [
        Item("/etc/sysusers.d/agentiso.conf", "file",
             source=REPO / "systemd" / "agentiso.sysusers.conf"),
        Item("/usr/share/polkit-1/actions/org.agentiso.helper.policy", "file",
             source=REPO / "polkit" / "org.agentiso.helper.policy"),
        Item("/etc/polkit-1/rules.d/50-agentiso.rules", "file",
             source=REPO / "polkit" / "org.agentiso.helper.rules"),
        Item("/usr/share/doc/agentiso", "dir", mode=0o755),
        Item("/usr/share/doc/agentiso/README.md", "file", source=REPO / "README.md"),
        Item("/etc/agentiso", "dir", mode=0o755),
        Item("/etc/agentiso/helper.toml", "file", content=helper_toml),
    ]
    if images:
        items += [Item("/var/lib/agentiso", "dir", mode=0o700),
                  Item("/var/lib/agentiso/images", "dir", mode=0o755)]
        items += [Item(f"/var/lib/agentiso/images/{i.name}", "tree", source=i) for i in images]
    return items


def mcp_servers_entry(bin_dir: str = "/usr/local/bin") -> str:
    """The JSON an MCP client's configuration takes to run agentiso (pure)."""
    entry = {"mcpServers": {"agentiso": {"command": f"{bin_dir}/agentiso", "args": ["serve"]}}}
    return json.dumps(entry, indent=2)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def on_root(destdir: Path, path: str) -> Path:
    return destdir / path.lstrip("/")


# --- install ---------------------------------------------------------------------------


def build_wheel(out: Path) -> Path:
    """The agentiso wheel of this checkout, built without its dependencies."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("agentiso-*.whl"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)])
    wheels = list(out.glob("agentiso-*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"pip wheel made {len(wheels)} agentiso wheels in {out}\n"
                           "remove the directory and run make install again")
    return wheels[0]


def make_venv(stage: Path, prefix: str, python: str, lock: Path, wheel: Path) -> None:
    """A virtualenv at ``stage`` that will work at ``prefix`` (they differ under a destdir)."""
    run([python, "-m", "venv", str(stage)])
    pip = [str(stage / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check", "--no-input"]
    run([*pip, "--require-hashes", "-r", str(lock)])
    run([*pip, "--no-deps", str(wheel)])
    if str(stage) != prefix:
        # pip wrote the staging path into scripts' #! lines and venv files.
        old, new = str(stage).encode(), prefix.encode()
        for f in [*(stage / "bin").iterdir(), stage / "pyvenv.cfg"]:
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                if old in data:
                    f.write_bytes(data.replace(old, new))


def install(args: argparse.Namespace) -> int:
    destdir = Path(args.destdir or "/")
    prefix = args.prefix.rstrip("/")
    stage = on_root(destdir, prefix)
    if (stage / MANIFEST).exists():
        raise InstallError(f"agentiso is already installed in {stage}\n"
                           "run make uninstall first (it keeps your helper.toml if you edited it)")
    from helper_toml import render

    images = [Path(i) for i in args.image]
    for image in images:
        if not (image / "rootfs.img").exists():
            raise InstallError(f"{image} is not a built guest image (no rootfs.img)\n"
                               "run make image first")
    items = plan(prefix, render().encode(), images)
    wheel = Path(args.wheel) if args.wheel else build_wheel(REPO / "build" / "dist")
    done: list[dict[str, object]] = []
    try:
        for item in items:
            done += parents(destdir, item.path)
            entry = put_down(item, destdir, stage, args, wheel)
            if entry is not None:
                done.append(entry)
                say(f"  + {item.path}")
            else:
                say(f"  = {item.path} (exists: left as it is)")
    finally:
        if stage.exists():
            write_manifest(stage, prefix, done)
    if args.destdir in ("", "/"):
        done += activate()
        write_manifest(stage, prefix, done)
    say("\nAdd users to the agentiso group (usermod -aG agentiso USER; they log in again).")
    say("MCP client configuration (e.g. in .mcp.json or the client's settings):")
    print(mcp_servers_entry())
    return 0


def write_manifest(stage: Path, prefix: str, entries: list[dict[str, object]]) -> None:
    record = {"version": 1, "prefix": prefix, "entries": entries}
    (stage / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def parents(destdir: Path, path: str) -> list[dict[str, object]]:
    """Make the missing directories above ``path``; their manifest entries, outermost first."""
    missing = []
    parent = Path(path).parent
    while not on_root(destdir, str(parent)).exists():
        missing.append(parent)
        parent = parent.parent
    entries: list[dict[str, object]] = []
    for d in reversed(missing):
        on_root(destdir, str(d)).mkdir(mode=0o755)
        entries.append({"path": str(d), "kind": "dir"})
    return entries


def put_down(item: Item, destdir: Path, stage: Path, args: argparse.Namespace,
             wheel: Path) -> dict[str, object] | None:
    """Make ``item``; its manifest entry, or None if something was there already."""
    dest = on_root(destdir, item.path)
    if item.kind == "tree" and item.path == args.prefix.rstrip("/"):
        if dest.exists():
            raise InstallError(f"{dest} exists and holds no agentiso install manifest\n"
                               "move it away or choose another --prefix")
        make_venv(stage, args.prefix.rstrip("/"), args.python, Path(args.lock), wheel)
        return {"path": item.path, "kind": "tree"}
    if dest.exists() or dest.is_symlink():
        return None
    if item.kind == "dir":
        dest.mkdir(mode=item.mode)
        dest.chmod(item.mode)
        return {"path": item.path, "kind": "dir"}
    if item.kind == "symlink":
        dest.symlink_to(item.target)
        return {"path": item.path, "kind": "symlink", "target": item.target}
    if item.kind == "tree":
        assert item.source is not None
        # Images are large sparse files: keep them sparse (and share blocks where the fs can).
        run(["cp", "-a", "--sparse=always", "--reflink=auto", str(item.source), str(dest)])
        return {"path": item.path, "kind": "tree"}
    if item.source is not None:
        shutil.copyfile(item.source, dest)
    else:
        dest.write_bytes(item.content or b"")
    dest.chmod(item.mode)
    return {"path": item.path, "kind": "file", "sha256": sha256(dest)}


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def group_exists(name: str = GROUP) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def activate() -> list[dict[str, object]]:
    """On the real root: the group, then (with systemd running) the socket.
    The group's manifest entry if this made it."""
    had_group = group_exists()
    run(["systemd-sysusers", "/etc/sysusers.d/agentiso.conf"])
    made: list[dict[str, object]] = []
    if not had_group and group_exists():
        made.append({"path": GROUP, "kind": "group"})
    if systemd_running():
        run(["systemctl", "daemon-reload"])
        run(["systemctl", "enable", "--now", "agentiso-helper.socket"])
        say("agentiso-helper.socket is enabled and listening on /run/agentiso/helper.sock")
    else:
        say("systemd is not running here: start the helper yourself, e.g.\n"
            "  /usr/local/bin/agentiso-helper serve --config /etc/agentiso/helper.toml")
    return made


# --- uninstall -------------------------------------------------------------------------


def removal(entry: dict[str, object], dest: Path) -> str | None:
    """Why ``entry`` must be kept, or None to remove it (pure over the file system's answers)."""
    kind = entry["kind"]
    if kind == "group":
        return group_in_use(str(entry["path"]))
    if not dest.exists() and not dest.is_symlink():
        return "already gone"
    if kind == "file" and sha256(dest) != entry["sha256"]:
        return "changed since install: yours now"
    if kind == "symlink" and (not dest.is_symlink() or os.readlink(dest) != entry["target"]):
        return "no longer the link install made"
    if kind == "dir" and any(dest.iterdir()):
        return "not empty"
    return None


def group_in_use(name: str) -> str | None:
    """Why the group must stay, or None (it is gone already, or nobody is in it)."""
    try:
        g = grp.getgrnam(name)
    except KeyError:
        return "already gone"
    if g.gr_mem:
        return "members: " + ", ".join(g.gr_mem)
    if any(p.pw_gid == g.gr_gid for p in pwd.getpwall()):
        return "a user's primary group"
    return None


def uninstall(args: argparse.Namespace) -> int:
    destdir = Path(args.destdir or "/")
    prefix = args.prefix.rstrip("/")
    manifest = on_root(destdir, prefix) / MANIFEST
    try:
        record = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise InstallError(f"no install manifest at {manifest}\n"
                           "nothing to uninstall (or give the --prefix used to install)") from None
    if args.destdir in ("", "/") and systemd_running():
        subprocess.run(["systemctl", "disable", "--now", *UNITS], check=False)
    # Reverse order: files before the directories that hold them.
    for entry in reversed(record["entries"]):
        dest = on_root(destdir, str(entry["path"]))
        why = removal(entry, dest)
        if why is not None:
            say(f"  = {entry['path']} kept: {why}")
            continue
        if entry["kind"] == "group":
            run(["groupdel", str(entry["path"])])
        elif entry["kind"] == "tree":
            shutil.rmtree(dest)
        elif entry["kind"] == "dir":
            dest.rmdir()
        else:
            dest.unlink()
        say(f"  - {entry['path']}")
    if args.destdir in ("", "/") and systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return 0


# --- edges -----------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(argv: list[str]) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise InstallError(f"{' '.join(argv[:4])} ... failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}\n"
                           "fix the cause above and run it again")


def default_python() -> str:
    """The system's python3 (every user can run it, unlike a pyenv under /root), else ours."""
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else getattr(sys, "_base_executable", sys.executable)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--destdir", default="", help="install under this root (packaging, tests)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv goes")
    p.add_argument("--python", default=default_python(),
                   help="the interpreter of the virtualenv (every user must be able to run it)")
    p.add_argument("--lock", default=str(REPO / "requirements.lock"))
    p.add_argument("--wheel", default="", help="the agentiso wheel (default: build it)")
    p.add_argument("--image", action="append", default=[], help="a built guest image directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0 and args.destdir in ("", "/"):
        say("make install needs root.\nrun it as root (sudo make install)")
        return 2
    try:
        return install(args) if args.action == "install" else uninstall(args)
    except InstallError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
