"""The pure part of the vsock channel, and its failure path on a host
without vsock (this machine: the real connection cannot be made here)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agentiso.privhelper import vsock


def _all_free(cid: int) -> bool:
    return True


def test_pick_cid_skips_reserved_and_taken() -> None:
    assert vsock.pick_cid([], free_in_kernel=_all_free) == 3
    assert vsock.pick_cid([3, 4, 6], free_in_kernel=_all_free) == 5
    assert vsock.pick_cid(range(3, 100), free_in_kernel=_all_free) == 100
    assert vsock.pick_cid([], first=1000, last=1001, free_in_kernel=_all_free) == 1000
    assert vsock.pick_cid([], first=0, free_in_kernel=_all_free) == 3  # 0-2 are reserved


def test_pick_cid_retries_cids_the_kernel_says_are_in_use() -> None:
    # Another hypervisor on the host holds 3, 5 and 7: EADDRINUSE for them.
    others = {3, 5, 7}
    asked: list[int] = []

    def free(cid: int) -> bool:
        asked.append(cid)
        return cid not in others

    assert vsock.pick_cid([4], free_in_kernel=free) == 6
    assert asked == [3, 5, 6]  # 4 is ours: not even asked


def test_pick_cid_gives_up_with_a_typed_error() -> None:
    from agentiso.protocol.errors import ErrorCode

    with pytest.raises(vsock.CidUnavailable) as info:
        vsock.pick_cid([], free_in_kernel=lambda cid: False)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert f"{vsock.MAX_CID_TRIES} held by other VMs" in info.value.message
    with pytest.raises(vsock.CidUnavailable):
        vsock.pick_cid([10, 11], first=10, last=11, free_in_kernel=_all_free)


def test_set_guest_cid_maps_eaddrinuse_to_false(tmp_path: Path) -> None:
    """The ioctl itself needs /dev/vhost-vsock; on a plain file it fails with
    ENOTTY, which is an error, not "in use"."""
    with open(tmp_path / "f", "wb") as f, pytest.raises(OSError) as info:
        vsock.set_guest_cid(f.fileno(), 3)
    assert info.value.errno == errno.ENOTTY
    # Without the device nothing can hold a CID.
    assert vsock.cid_free_in_kernel(3, device=str(tmp_path / "absent"))


def test_set_guest_cid_on_the_real_device() -> None:
    if not vsock.available():
        pytest.skip(reason="no /dev/vhost-vsock on this host: the ioctl cannot run here")
    fd = os.open(vsock.VHOST_VSOCK, os.O_RDWR)
    try:
        cid = vsock.pick_cid([])
        assert vsock.set_guest_cid(fd, cid) and vsock.set_guest_cid(fd, cid)  # again: fine
        assert not vsock.cid_free_in_kernel(cid)  # held by fd: EADDRINUSE for another
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_connect_to_an_absent_guest_is_an_oserror() -> None:
    if vsock.available():
        pytest.skip(reason="this host has vhost-vsock: the unreachable-guest path differs")
    with pytest.raises(OSError):
        await vsock.connect(4_000_000, 5000)


def test_the_helpers_secret_is_one_the_agent_accepts() -> None:
    from agentiso.protocol.guest_constants import SECRET_MAX_BYTES, SECRET_MIN_BYTES

    assert SECRET_MIN_BYTES <= vsock.SECRET_BYTES <= SECRET_MAX_BYTES
