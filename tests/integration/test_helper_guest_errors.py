"""A guest-side failure during VmStart, through the real helper and a real VM.

The image ``nonic`` is the minimal image with ``module_blacklist=virtio_net``
on its kernel command line: the VM has a virtio-net device but the guest
loads no driver for it, so when the helper asks the agent to configure the
interface with the VM's MAC, the agent (honestly) finds none and answers
``not_found``.  That is the guest's answer, not the helper's: the client must
get ``guest_failed`` with the guest's code and text in the message, never a
``not_found`` that would read as "no such VM or volume".  And VmStart is all
or nothing: the half-started VM is gone afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentiso.protocol import helper as hp
from agentiso.protocol.blocking import BlockingHelperClient
from agentiso.protocol.errors import GuestFailed
from tests.harness.images import skip_unless_image
from tests.support.helper_process import (
    IMAGES,
    HelperProcess,
    public_tmpdir,
    running_helper,
)

IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.img")
pytestmark = skip_unless_image("minimal")


def _nicless_image(images: Path) -> None:
    """``images/nonic``: the minimal image's files (hard links: a rebuild of
    the image cannot change them under the test) with a manifest whose
    command line keeps the guest from driving its NIC."""
    src = IMAGES / "minimal"
    dest = images / "nonic"
    dest.mkdir(mode=0o755)
    manifest = json.loads((src / "manifest.json").read_text())
    for f in IMAGE_FILES:
        os.link(src / f, dest / f)
    manifest["name"] = "nonic"
    manifest["cmdline"] += " module_blacklist=virtio_net"
    (dest / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def helper() -> Iterator[HelperProcess]:
    images = public_tmpdir("agentiso-images-")
    try:
        _nicless_image(images)
        with running_helper(group=0, extra_args=("--images-dir", str(images))) as h:
            yield h
    finally:
        shutil.rmtree(images)


def test_a_guest_side_failure_during_vm_start_reaches_the_client_as_guest_failed(
    helper: HelperProcess,
) -> None:
    with BlockingHelperClient(str(helper.socket), timeout=180) as c:
        c.request(hp.VolumeCreate(id=0, name="nonic-vol", source=hp.FromImage(image="nonic")))
        with pytest.raises(GuestFailed) as info:
            c.request(hp.VmStart(id=0, name="nonic", volume="nonic-vol"))
        message = info.value.message
        assert info.value.code == "guest_failed"
        # It says the guest failed, which step, and carries the guest's own code and text.
        assert "the guest failed ConfigureNetwork" in message, message
        assert "[not_found]" in message and "no interface with MAC" in message, message
        # All or nothing: no VM, no QEMU, the volume is free again.
        vms = c.request(hp.VmList(id=0))
        assert isinstance(vms, hp.Vms) and vms.vms == []
        assert helper.qemu_pids() == []
        c.request(hp.VolumeDestroy(id=0, name="nonic-vol"))
