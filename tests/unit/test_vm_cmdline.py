"""The pure QEMU command-line builder: every option it emits, and escaping."""

from __future__ import annotations

import json

import msgspec

from agentiso.privhelper.vm.cmdline import SANDBOX, build_argv, escape_opt, kernel_cmdline
from agentiso.privhelper.vm.spec import (
    Accel,
    DiskLayer,
    Incoming,
    MemoryFile,
    NetAttachment,
    VirtioSerialChannel,
    VmSpec,
    VsockChannel,
)


def make_spec(**kw: object) -> VmSpec:
    base = VmSpec(
        name="ws1",
        kernel="/img/vmlinuz",
        initrd="/img/initrd.img",
        cmdline="console=ttyS0 quiet",
        disks=(DiskLayer(format="raw", fd=10),),
        channel=VirtioSerialChannel(socket_path="/run/a/ws1/agent.sock"),
        qmp_socket="/run/a/ws1/qmp.sock",
        console_socket="/run/a/ws1/console.sock",
    )
    return msgspec.structs.replace(base, **kw)


def opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == opt]


def test_base_command_line() -> None:
    argv = build_argv(make_spec(), "/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-S"):
        assert flag in argv
    assert opt_values(argv, "-sandbox") == [SANDBOX]
    assert "elevateprivileges=deny" in SANDBOX and "spawn=deny" in SANDBOX
    assert "-runas" not in argv
    assert opt_values(argv, "-name") == ["guest=agentiso-ws1,process=agentiso-ws1"]
    assert opt_values(argv, "-M") == [
        "microvm,acpi=on,isa-serial=on,rtc=on,dump-guest-core=off,mem-merge=off"
    ]
    assert opt_values(argv, "-accel") == ["tcg,tb-size=64"]
    assert opt_values(argv, "-smp") == ["1"]
    assert opt_values(argv, "-m") == ["256M"]
    assert opt_values(argv, "-kernel") == ["/img/vmlinuz"]
    assert opt_values(argv, "-initrd") == ["/img/initrd.img"]
    assert opt_values(argv, "-append") == ["console=ttyS0 quiet"]
    assert opt_values(argv, "-serial") == ["chardev:console"]
    assert opt_values(argv, "-mon") == ["chardev=qmp,mode=control"]
    chardevs = opt_values(argv, "-chardev")
    assert "socket,id=console,path=/run/a/ws1/console.sock,server=on,wait=off" in chardevs
    assert "socket,id=qmp,path=/run/a/ws1/qmp.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent,path=/run/a/ws1/agent.sock,server=on,wait=off" in chardevs
    devices = opt_values(argv, "-device")
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=org.agentiso.agent.0" in devices
    assert "virtio-blk-device,drive=disk0,id=vda" in devices
    assert "-netdev" not in argv and "-fw_cfg" not in argv and "-incoming" not in argv


def test_no_initrd() -> None:
    argv = build_argv(make_spec(initrd=None))
    assert "-initrd" not in argv


def test_not_paused() -> None:
    assert "-S" not in build_argv(make_spec(start_paused=False))


def test_kvm_turns_off_legacy_timers() -> None:
    argv = build_argv(make_spec(accel=Accel(kind="kvm")))
    assert opt_values(argv, "-accel") == ["kvm"]
    assert opt_values(argv, "-cpu") == ["host"]
    assert opt_values(argv, "-M") == [
        "microvm,acpi=on,isa-serial=on,rtc=on,dump-guest-core=off,mem-merge=off,pit=off,pic=off"
    ]


def test_tcg_keeps_pit_and_sets_tb_size() -> None:
    argv = build_argv(make_spec(accel=Accel(kind="tcg", tb_size_mib=32), vcpus=2, memory_mib=512))
    assert opt_values(argv, "-accel") == ["tcg,tb-size=32"]
    assert "pit=off" not in opt_values(argv, "-M")[0]
    assert opt_values(argv, "-smp") == ["2"]
    assert opt_values(argv, "-m") == ["512M"]


def test_tsc_khz_under_tcg_is_this_hosts() -> None:
    spec = make_spec(tsc_khz=2596106)
    assert opt_values(build_argv(spec), "-append") == ["console=ttyS0 quiet tsc_early_khz=2596106"]
    # an image built elsewhere carries its build host's rate: ours replaces it
    foreign = make_spec(tsc_khz=3000000, cmdline="console=ttyS0 tsc_early_khz=2596105 quiet")
    assert kernel_cmdline(foreign) == "console=ttyS0 quiet tsc_early_khz=3000000"
    # host rate unknown: keep the image's
    unknown = make_spec(tsc_khz=None, cmdline="console=ttyS0 tsc_early_khz=2596105")
    assert kernel_cmdline(unknown) == "console=ttyS0 tsc_early_khz=2596105"
    assert kernel_cmdline(make_spec(tsc_khz=None)) == "console=ttyS0 quiet"


def test_no_tsc_khz_under_kvm() -> None:
    kvm = make_spec(tsc_khz=2596106, accel=Accel(kind="kvm"))
    assert kernel_cmdline(kvm) == "console=ttyS0 quiet"
    image = make_spec(accel=Accel(kind="kvm"), cmdline="console=ttyS0 tsc_early_khz=5 quiet")
    assert kernel_cmdline(image) == "console=ttyS0 quiet"


def blockdevs(argv: list[str]) -> list[dict[str, object]]:
    """The -blockdev values as dicts (JSON or key=value syntax)."""
    out: list[dict[str, object]] = []
    for v in opt_values(argv, "-blockdev"):
        if v.startswith("{"):
            out.append(json.loads(v))
        else:
            parts = v.replace(",,", "\0").split(",")
            out.append(dict(p.replace("\0", ",").split("=", 1) for p in parts))
    return out


def test_single_raw_disk_by_fd() -> None:
    argv = build_argv(make_spec())
    assert opt_values(argv, "-add-fd") == ["fd=10,set=1,opaque=disk-layer-0"]
    assert blockdevs(argv) == [
        {"driver": "file", "node-name": "disk0-file0", "filename": "/dev/fdset/1",
         "read-only": "off", "discard": "unmap"},
        {"driver": "raw", "node-name": "disk0", "file": "disk0-file0", "read-only": False,
         "discard": "unmap", "detect-zeroes": "unmap"},
    ]  # fmt: skip


def test_qcow2_chain_bottom_first_with_explicit_backing() -> None:
    spec = make_spec(
        disks=(
            DiskLayer(format="qcow2", fd=11),
            DiskLayer(format="qcow2", fd=12, read_only=True),
            DiskLayer(format="raw", path="/img/root.img", read_only=True),
        )
    )
    argv = build_argv(spec)
    assert opt_values(argv, "-add-fd") == [
        "fd=12,set=2,opaque=disk-layer-1",
        "fd=11,set=1,opaque=disk-layer-0",
    ]
    bd = blockdevs(argv)
    assert [(b["node-name"], b.get("filename"), b.get("backing", "-")) for b in bd] == [
        ("disk0-file2", "/img/root.img", "-"),
        ("disk0-layer2", None, "-"),
        ("disk0-file1", "/dev/fdset/2", "-"),
        ("disk0-layer1", None, "disk0-layer2"),
        ("disk0-file0", "/dev/fdset/1", "-"),
        ("disk0", None, "disk0-layer1"),
    ]
    assert [b["read-only"] for b in bd] == ["on", True, "on", True, "off", False]
    # -add-fd must precede the -blockdev that uses its set.
    assert argv.index("-add-fd") < argv.index("-blockdev")


def test_bottom_qcow2_has_backing_null() -> None:
    """Without an explicit null QEMU would open the backing path from the image header."""
    argv = build_argv(make_spec(disks=(DiskLayer(format="qcow2", fd=10),)))
    top = blockdevs(argv)[1]
    assert "backing" in top and top["backing"] is None


def test_vsock_channel() -> None:
    argv = build_argv(make_spec(channel=VsockChannel(guest_cid=42, vhost_fd=20)))
    assert "vhost-vsock-device,id=vsock0,guest-cid=42,vhostfd=20" in opt_values(argv, "-device")
    assert not any(d.startswith("virtserialport") for d in opt_values(argv, "-device"))
    no_fd = build_argv(make_spec(channel=VsockChannel(guest_cid=3)))
    assert "vhost-vsock-device,id=vsock0,guest-cid=3" in opt_values(no_fd, "-device")


def test_network_attachment() -> None:
    argv = build_argv(make_spec(net=NetAttachment(tap_fd=21, mac="52:54:00:0a:2a:00")))
    assert opt_values(argv, "-netdev") == ["tap,id=net0,fd=21,vhost=off"]
    assert "virtio-net-device,netdev=net0,mac=52:54:00:0a:2a:00" in opt_values(argv, "-device")


def test_fw_cfg_secret_file() -> None:
    argv = build_argv(make_spec(fw_cfg_secret_file="/run/a/ws1/secret"))
    assert opt_values(argv, "-fw_cfg") == ["name=opt/org.agentiso/secret,file=/run/a/ws1/secret"]
    assert not any("string=" in a for a in argv)


def test_incoming_fd_and_defer() -> None:
    assert opt_values(build_argv(make_spec(incoming=Incoming(fd=30))), "-incoming") == ["fd:30"]
    assert opt_values(build_argv(make_spec(incoming=Incoming())), "-incoming") == ["defer"]


def test_escape_opt() -> None:
    assert escape_opt("a,b") == "a,,b"
    assert escape_opt("plain") == "plain"


def test_comma_in_paths_cannot_inject_options() -> None:
    evil = "/run/a/x,server=off,path=/etc/passwd"
    spec = make_spec(
        console_socket=evil,
        disks=(DiskLayer(format="raw", path="/img/a,driver=vvfat"),),
        fw_cfg_secret_file="/s,string=leak",
    )
    argv = build_argv(spec)
    assert (
        "socket,id=console,path=/run/a/x,,server=off,,path=/etc/passwd,server=on,wait=off"
        in opt_values(argv, "-chardev")
    )
    assert blockdevs(argv)[0]["filename"] == "/img/a,driver=vvfat"
    assert blockdevs(argv)[0]["driver"] == "file"
    assert opt_values(argv, "-fw_cfg") == ["name=opt/org.agentiso/secret,file=/s,,string=leak"]


def test_argv_is_deterministic() -> None:
    assert build_argv(make_spec()) == build_argv(make_spec())


def test_sockets_as_listening_fds() -> None:
    """The helper's listening sockets: QEMU serves them and never creates a path."""
    spec = make_spec(
        qmp_fd=30,
        console_fd=31,
        channel=VirtioSerialChannel(socket_path="/run/a/ws1/agent.sock", listen_fd=32),
    )
    chardevs = opt_values(build_argv(spec), "-chardev")
    assert chardevs == [
        "socket,id=agent,fd=32,server=on,wait=off",
        "socket,id=console,fd=31,server=on,wait=off",
        "socket,id=qmp,fd=30,server=on,wait=off",
    ]
    assert not any("path=" in c for c in chardevs)


def test_fw_cfg_secret_fd() -> None:
    argv = build_argv(make_spec(fw_cfg_secret_fd=33))
    assert opt_values(argv, "-fw_cfg") == ["name=opt/org.agentiso/secret,file=/proc/self/fd/33"]


def test_no_memory_file_means_anonymous_ram() -> None:
    argv = build_argv(make_spec())
    assert not opt_values(argv, "-object")
    assert "memory-backend" not in opt_values(argv, "-M")[0]


def test_memory_file_is_named_through_proc_self_fd() -> None:
    for share, word in ((True, "share=on"), (False, "share=off")):
        argv = build_argv(make_spec(memory_file=MemoryFile(fd=12, share=share)))
        (obj,) = opt_values(argv, "-object")
        assert obj == (f"memory-backend-file,id=ram,size=256M,mem-path=/proc/self/fd/12,"
                       f"{word},dump=off,merge=off")
        assert opt_values(argv, "-M")[0].endswith(",memory-backend=ram")
        assert opt_values(argv, "-m") == ["256M"]


def test_memory_file_fd_is_checked_like_every_fd() -> None:
    import pytest

    from agentiso.privhelper.vm.errors import InvalidVmSpec

    for bad in (-1, 1, True):
        with pytest.raises(InvalidVmSpec):
            build_argv(make_spec(memory_file=MemoryFile(fd=bad)))  # type: ignore[arg-type]
    with pytest.raises(InvalidVmSpec, match="twice"):  # the disk's fd
        build_argv(make_spec(memory_file=MemoryFile(fd=10)))
