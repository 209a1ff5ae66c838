"""Validation of VmSpec: every rule gets an input that tries to break it."""

from __future__ import annotations

import msgspec
import pytest

from agentiso.privhelper.errors import HelperError
from agentiso.privhelper.vm.cmdline import build_argv
from agentiso.privhelper.vm.errors import InvalidVmSpec
from agentiso.privhelper.vm.spec import (
    Accel,
    DiskLayer,
    Incoming,
    NetAttachment,
    VirtioSerialChannel,
    VmSpec,
    VsockChannel,
    validate_spec,
)
from agentiso.protocol.errors import ErrorCode

from .test_vm_cmdline import make_spec


def refused(spec: VmSpec, fragment: str) -> None:
    with pytest.raises(InvalidVmSpec) as ei:
        build_argv(spec)
    assert fragment in ei.value.message
    assert ei.value.code is ErrorCode.INVALID
    assert isinstance(ei.value, HelperError)


def test_good_spec_passes() -> None:
    validate_spec(make_spec())


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "..", "a..b/c", "x\0y", "a" * 64, "UPPER", "-lead", "semi;colon", "sp ace",
     "$(rm)", "a`b`", "é", "a_b"],
)  # fmt: skip
def test_bad_names(name: str) -> None:
    refused(make_spec(name=name), "VM name")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("relative/vmlinuz", "not absolute"),
        ("", "non-empty"),
        ("/a\0b", "NUL"),
        ("/a\nb", "line break"),
        ("/img/../etc/shadow", "'..'"),
        ("/" + "a" * 5000, "longer than"),
    ],
)
def test_bad_kernel_paths(path: str, why: str) -> None:
    refused(make_spec(kernel=path), why)


def test_bad_initrd() -> None:
    refused(make_spec(initrd="initrd.img"), "initrd")


def test_socket_path_length_limit() -> None:
    long = "/" + "s" * 107
    refused(make_spec(qmp_socket=long), "qmp socket")
    refused(make_spec(console_socket=long), "console socket")
    refused(make_spec(channel=VirtioSerialChannel(socket_path=long)), "guest channel")
    ok = "/" + "s" * 106
    validate_spec(make_spec(qmp_socket=ok))


def test_sockets_must_differ() -> None:
    refused(make_spec(qmp_socket="/run/a/ws1/console.sock"), "distinct")


@pytest.mark.parametrize(
    "cmdline", ["console=ttyS0\ninit=/bin/sh", "a\0b", "x" * 2048, "caf\u00e9", "tab\there"]
)
def test_bad_cmdline(cmdline: str) -> None:
    refused(make_spec(cmdline=cmdline), "command line")


@pytest.mark.parametrize("vcpus", [0, -1, 65, 10**9])
def test_bad_vcpus(vcpus: int) -> None:
    refused(make_spec(vcpus=vcpus), "vcpus")


def test_bool_is_not_a_count() -> None:
    refused(make_spec(vcpus=True), "vcpus")


@pytest.mark.parametrize("mem", [0, 63, -256, 1024 * 1024 + 1, 2**62])
def test_bad_memory(mem: int) -> None:
    refused(make_spec(memory_mib=mem), "memory_mib")


@pytest.mark.parametrize("tb", [0, -1, 4097])
def test_bad_tb_size(tb: int) -> None:
    refused(make_spec(accel=Accel(kind="tcg", tb_size_mib=tb)), "tb_size_mib")


def test_bad_accel_kind() -> None:
    refused(make_spec(accel=Accel(kind="hvf")), "accelerator")  # type: ignore[arg-type]


@pytest.mark.parametrize("khz", [0, 999, 10**9])
def test_bad_tsc_khz(khz: int) -> None:
    refused(make_spec(tsc_khz=khz), "tsc_khz")


def test_disk_rules() -> None:
    refused(make_spec(disks=()), "at least one layer")
    refused(make_spec(disks=(DiskLayer(format="raw"),)), "exactly one of path and fd")
    refused(
        make_spec(disks=(DiskLayer(format="raw", fd=10, path="/x"),)), "exactly one of path and fd"
    )
    refused(make_spec(disks=(DiskLayer(format="vmdk", fd=10),)), "format")  # type: ignore[arg-type]
    refused(make_spec(disks=(DiskLayer(format="raw", path="rel.img"),)), "not absolute")
    # a raw layer cannot have a backing layer
    refused(
        make_spec(
            disks=(DiskLayer(format="raw", fd=10), DiskLayer(format="raw", fd=11, read_only=True))
        ),
        "only a qcow2 layer",
    )
    # backing layers are read-only
    refused(
        make_spec(disks=(DiskLayer(format="qcow2", fd=10), DiskLayer(format="raw", fd=11))),
        "read-only",
    )
    too_many = tuple(DiskLayer(format="qcow2", fd=100 + i, read_only=i > 0) for i in range(65))
    refused(make_spec(disks=too_many), "more than")


@pytest.mark.parametrize("fd", [-1, 0, 1, 2, 65536])
def test_bad_fds(fd: int) -> None:
    refused(make_spec(disks=(DiskLayer(format="raw", fd=fd),)), "fd")
    refused(make_spec(net=NetAttachment(tap_fd=fd, mac="52:54:00:00:00:01")), "TAP")
    refused(make_spec(incoming=Incoming(fd=fd)), "incoming")
    refused(make_spec(channel=VsockChannel(guest_cid=3, vhost_fd=fd)), "vhost-vsock")


def test_fd_reuse_refused() -> None:
    refused(make_spec(net=NetAttachment(tap_fd=10, mac="52:54:00:00:00:01")), "twice")
    refused(make_spec(incoming=Incoming(fd=10)), "twice")


@pytest.mark.parametrize("cid", [0, 1, 2, -5, 0xFFFFFFFF, 2**40])
def test_bad_guest_cid(cid: int) -> None:
    refused(make_spec(channel=VsockChannel(guest_cid=cid)), "guest CID")


@pytest.mark.parametrize(
    "mac",
    ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:00:00", "52-54-00-00-00-01",
     "52:54:00:00:00:0g", "52:54:00:00:00:01,model=e1000", "52:54:00:AA:00:01", ""],
)  # fmt: skip
def test_bad_macs(mac: str) -> None:
    refused(make_spec(net=NetAttachment(tap_fd=21, mac=mac)), "MAC")


def test_bad_secret_path() -> None:
    refused(make_spec(fw_cfg_secret_file="secret"), "fw_cfg")


def test_spec_roundtrips_through_json() -> None:
    spec = make_spec(net=NetAttachment(tap_fd=21, mac="52:54:00:00:00:01"))
    again = msgspec.json.decode(msgspec.json.encode(spec), type=VmSpec)
    assert again == spec


def test_unknown_fields_refused_on_decode() -> None:
    data = msgspec.json.encode(make_spec())
    obj = msgspec.json.decode(data)
    obj["extra"] = 1
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(obj, VmSpec)


def test_listen_and_secret_fds_are_checked() -> None:
    refused(make_spec(qmp_fd=2), "qmp listen")
    refused(make_spec(console_fd=70000), "console listen")
    refused(
        make_spec(channel=VirtioSerialChannel(socket_path="/run/a/ws1/agent.sock", listen_fd=1)),
        "guest channel listen",
    )
    refused(make_spec(fw_cfg_secret_fd=-1), "fw_cfg secret")
    refused(make_spec(qmp_fd=10), "twice")  # the disk's fd
    refused(make_spec(qmp_fd=30, console_fd=30), "twice")
    refused(make_spec(fw_cfg_secret_fd=30, fw_cfg_secret_file="/s"), "not both")
