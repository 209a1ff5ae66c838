"""The helper's request table: every request type has exactly one service."""

from __future__ import annotations

import typing
from typing import Any, ClassVar

import pytest

from agentiso.privhelper.vms import SERVICE_TYPES, claims
from agentiso.protocol import helper as hp

#: Served by the server itself (the handshake, liveness, identity) or turning
#: the connection into a guest channel.
SERVER_OWN = {hp.Hello, hp.Ping, hp.WhoAmI, hp.GuestOpen}


def test_every_request_type_is_handled_by_exactly_one_service() -> None:
    owner = claims(SERVICE_TYPES)  # raises if two services claim one type
    requests = set(typing.get_args(hp.HelperRequest))
    assert set(owner) == requests - SERVER_OWN
    assert owner[hp.SnapshotCreate] == "LiveSnapshots"


def test_a_request_type_claimed_twice_is_refused() -> None:
    class Extra:
        HANDLES: ClassVar[dict[type[Any], str]] = {hp.VmStart: "vm_start"}

    with pytest.raises(ValueError, match="VmStart is handled by both VmLifecycle and Extra"):
        claims([*SERVICE_TYPES, Extra])


def test_every_claimed_method_exists() -> None:
    for service in SERVICE_TYPES:
        for req, method in service.HANDLES.items():
            assert callable(getattr(service, method, None)), (service.__name__, req.__name__)
