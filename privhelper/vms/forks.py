"""Resuming another VM's saved memory with a new identity (``VmStart(resume_from=...)``).

A fork starts as a byte-for-byte copy of the VM that saved the memory: its
MAC and address, hostname, machine-id, the kernel's random state and a clock
stopped at the save.  So the helper resumes it with the NIC's link down
(QEMU ``set_link``, before the first ``cont``), gives it a fresh address from
the pool and the MAC derived from it (its TAP and anti-spoofing rules are
made for those only), has the agent take the new identity
(:class:`~agentiso.protocol.guest.Reidentify`), and only then brings the
link up.  The memory file stays the source snapshot's: read-only, shared by
any number of forks.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from dataclasses import dataclass

from agentiso.protocol import guest as gp
from agentiso.protocol import helper as hp
from agentiso.protocol.errors import ErrorCode

from ..errors import RequestFailed
from ..net.manager import Attachment as NetAttachmentInfo
from ..net.naming import mac_for
from ..registry import Registry, VolumeRecord

#: Random bytes mixed into a fork's kernel pool (512 bits).
ENTROPY_BYTES = 64
MACHINE_ID_PATH = "/etc/machine-id"


def new_machine_id() -> str:
    """A random machine-id (128 bits, 32 hex digits, as systemd makes them)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class ForkSource:
    """What a fork resumes: the snapshot's memory file (in the helper's
    memory directory) and the MAC its guest still has."""

    memory_file: str
    old_mac: str | None
    #: vsock only: the secret (hex) the resumed agent still demands.
    secret: str | None = None


def clone_mark(volume_key: str, snapshot: str) -> str:
    """The value of ``VolumeRecord.pristine_clone_of`` for a clone of that snapshot."""
    return f"{volume_key}@{snapshot}"


def fork_source(registry: Registry, owner: int, vol: VolumeRecord, req: hp.VmStart) -> ForkSource:
    """Check that ``req.resume_from`` may be resumed on ``vol`` (the caller
    holds the registry lock), and say what to resume.

    Refused: both ways of resuming at once (``invalid``); a snapshot without
    memory, a volume that is not an unused clone of exactly that snapshot,
    another size than the saving VM's, or no network (``conflict``); another
    uid's or a missing volume or snapshot (``not_found``)."""
    src_ref = req.resume_from
    if src_ref is None:
        raise ValueError("fork_source needs resume_from")
    if req.resume_snapshot is not None:
        raise RequestFailed(
            ErrorCode.INVALID, "give resume_snapshot or resume_from, not both"
        )
    src = registry.volume(owner, src_ref.volume)
    snap = src.snapshot(src_ref.snapshot)
    where = f"snapshot {snap.name!r} of volume {src.name!r}"
    if snap.memory_file is None:
        raise RequestFailed(
            ErrorCode.CONFLICT,
            f"{where} has no saved memory to resume from (take it with memory=true)",
        )
    if vol.pristine_clone_of != clone_mark(src.key, snap.name):
        raise RequestFailed(
            ErrorCode.CONFLICT,
            f"volume {vol.name!r} is not an unused clone of {where}: create a new one with "
            f"VolumeCreate(source=FromSnapshot(volume={src.name!r}, snapshot={snap.name!r}))",
        )
    if snap.memory_mib is not None and (snap.vcpus, snap.memory_mib) != (
        req.vcpus, req.memory_mib
    ):
        raise RequestFailed(
            ErrorCode.CONFLICT,
            f"{where} was saved by a VM of {snap.vcpus} vCPUs and {snap.memory_mib} MiB; "
            f"a VM resumed from it needs the same (asked: {req.vcpus} vCPUs, "
            f"{req.memory_mib} MiB)",
        )
    if req.network is None:
        raise RequestFailed(
            ErrorCode.CONFLICT,
            "a VM resumed with a new identity needs a network interface (network must "
            "not be null)",
        )
    old_mac = None
    if snap.address is not None:
        addr = ipaddress.ip_address(snap.address)
        if isinstance(addr, ipaddress.IPv4Address):
            old_mac = mac_for(addr)
    return ForkSource(memory_file=snap.memory_file, old_mac=old_mac, secret=snap.secret)


def reidentify_request(
    hostname: str, net: NetAttachmentInfo, old_mac: str | None
) -> gp.Reidentify:
    """The guest request that gives a fork its new identity: the attachment's
    address and MAC, a new machine-id, fresh entropy and the host's clock."""
    return gp.Reidentify(
        id=0,
        mac=net.mac,
        address=net.address,
        prefix=net.prefix,
        gateway=net.gateway,
        dns=list(net.dns),
        hostname=hostname,
        machine_id=new_machine_id(),
        entropy=secrets.token_bytes(ENTROPY_BYTES),
        time_ns=time.time_ns(),
        old_mac=old_mac,
    )
