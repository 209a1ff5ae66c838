"""The pure part of the vsock channel, and its failure path on a host
without vsock (this machine: the real connection cannot be made here)."""

from __future__ import annotations

import pytest

from agentiso.privhelper import vsock


def test_pick_cid_skips_reserved_and_taken() -> None:
    assert vsock.pick_cid([]) == 3
    assert vsock.pick_cid([3, 4, 6]) == 5
    assert vsock.pick_cid(range(3, 100)) == 100


@pytest.mark.anyio
async def test_connect_to_an_absent_guest_is_an_oserror() -> None:
    if vsock.available():
        pytest.skip(reason="this host has vhost-vsock: the unreachable-guest path differs")
    with pytest.raises(OSError):
        await vsock.connect(4_000_000, 5000)


def test_the_helpers_secret_is_one_the_agent_accepts() -> None:
    from agentiso.protocol.guest_constants import SECRET_MAX_BYTES, SECRET_MIN_BYTES

    assert SECRET_MIN_BYTES <= vsock.SECRET_BYTES <= SECRET_MAX_BYTES
