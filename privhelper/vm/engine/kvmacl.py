"""/dev/kvm for one VM uid at a time: a POSIX ACL entry instead of a shared group.

Where ``/dev/kvm`` is open to a group (``root:kvm 0660``), an unprivileged QEMU
could run with that group as its gid -- but then every VM uid shares it, and a
file one QEMU makes group-readable is readable by the others.  Where the device
node supports POSIX ACLs (devtmpfs with ``CONFIG_TMPFS_POSIX_ACL``, as on
systemd hosts, where udev's ``uaccess`` uses them), the engine instead adds
``user:<vm uid>:rw`` to ``system.posix_acl_access`` just before the spawn and
removes it once QEMU has opened the device (the kernel checks at ``open``
only), and QEMU runs with its own gid.  Entries of range uids left by a helper
that died in between are removed at the next start.

The ACL arithmetic is pure and keeps every other entry's effective rights
exactly as they were (the mask never widens the owning group's access).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable

ACL_XATTR = "system.posix_acl_access"
ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
RW = 6
_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

#: (tag, perm, id)
Entry = tuple[int, int, int]


def decode_acl(data: bytes) -> list[Entry]:
    if len(data) < _HEAD.size or (len(data) - _HEAD.size) % _ENTRY.size:
        raise ValueError("malformed ACL xattr")
    (version,) = _HEAD.unpack_from(data)
    if version != ACL_VERSION:
        raise ValueError(f"ACL xattr version {version}")
    return [_ENTRY.unpack_from(data, off) for off in range(_HEAD.size, len(data), _ENTRY.size)]


def encode_acl(entries: Iterable[Entry]) -> bytes:
    """The xattr, entries in the order the kernel demands (tag, then id)."""
    ordered = sorted(entries, key=lambda e: (e[0], e[2] if e[0] in (USER, GROUP) else 0))
    return _HEAD.pack(ACL_VERSION) + b"".join(_ENTRY.pack(*e) for e in ordered)


def acl_from_mode(mode: int) -> list[Entry]:
    """The minimal ACL a file without one has: its mode bits."""
    return [
        (USER_OBJ, (mode >> 6) & 7, UNDEFINED_ID),
        (GROUP_OBJ, (mode >> 3) & 7, UNDEFINED_ID),
        (OTHER, mode & 7, UNDEFINED_ID),
    ]


def _mask(entries: list[Entry]) -> int | None:
    return next((perm for tag, perm, _ in entries if tag == MASK), None)


def with_user(entries: list[Entry], uid: int, perm: int = RW) -> list[Entry]:
    """``entries`` plus ``user:uid:perm``.  The group-class entries are first
    clamped to their effective rights under the old mask, so the new mask
    (their union with ``perm``) widens nobody's access but ``uid``'s."""
    old_mask = _mask(entries)
    out: list[Entry] = []
    for tag, p, ident in entries:
        if tag == MASK or (tag == USER and ident == uid):
            continue
        if tag in (USER, GROUP, GROUP_OBJ) and old_mask is not None:
            p &= old_mask
        out.append((tag, p, ident))
    out.append((USER, perm, uid))
    union = 0
    for tag, p, _ in out:
        if tag in (USER, GROUP, GROUP_OBJ):
            union |= p
    out.append((MASK, union, UNDEFINED_ID))
    return out


def without_user(entries: list[Entry], uid: int) -> list[Entry]:
    """``entries`` without ``user:uid``; with no named entry left, the
    minimal ACL (the owning group at its effective rights, no mask)."""
    out = [e for e in entries if not (e[0] == USER and e[2] == uid)]
    if any(tag in (USER, GROUP) for tag, _, _ in out):
        return out
    mask = _mask(out)
    minimal = []
    for tag, p, ident in out:
        if tag == MASK:
            continue
        if tag == GROUP_OBJ and mask is not None:
            p &= mask
        minimal.append((tag, p, ident))
    return minimal


def named_users(entries: Iterable[Entry]) -> set[int]:
    return {ident for tag, _, ident in entries if tag == USER}


class KvmAcl:
    """The ACL of the KVM device node (an adapter; the helper is root)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        #: Set by the accelerator decision: VMs get per-uid entries.
        self.per_uid = False

    def supported(self) -> bool:
        """Whether the node's filesystem keeps POSIX ACLs."""
        try:
            os.getxattr(self.path, ACL_XATTR)
        except OSError as exc:
            return exc.errno == errno.ENODATA
        return True

    def entries(self) -> list[Entry]:
        try:
            return decode_acl(os.getxattr(self.path, ACL_XATTR))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        return acl_from_mode(stat.S_IMODE(os.stat(self.path).st_mode))

    def _write(self, entries: list[Entry]) -> None:
        os.setxattr(self.path, ACL_XATTR, encode_acl(entries))

    def grant(self, uid: int) -> None:
        self._write(with_user(self.entries(), uid))

    def revoke(self, uid: int) -> None:
        entries = self.entries()
        if uid in named_users(entries):
            self._write(without_user(entries, uid))

    def revoke_stale(self, uids: range, keep: set[int]) -> list[int]:
        """Remove the entries of ``uids`` (the VM range) not in ``keep``."""
        entries = self.entries()
        stale = sorted(u for u in named_users(entries) if u in uids and u not in keep)
        for uid in stale:
            entries = without_user(entries, uid)
        if stale:
            self._write(entries)
        return stale
