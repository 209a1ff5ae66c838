"""Pure ``VmSpec -> argv`` builder for ``qemu-system-x86_64 -M microvm``.

Decisions (see docs/vm-engine.md):

* ``-nodefaults -no-user-config -nographic``: nothing but what we list exists.
* microvm with ``acpi=on`` (a GED device lets ``system_powerdown`` reach the
  guest), ``isa-serial=on`` (the console), ``rtc=on``.  Under KVM the legacy
  PIT and PIC are turned off (kvmclock replaces them); under TCG the stock
  kernel cannot calibrate its TSC without the PIT and hangs, so they stay.
* Disks are always ``-blockdev`` graphs on ``/dev/fdset/N`` (``-add-fd``): QEMU
  never opens a disk path.  Every layer of a qcow2 chain is its own node with
  an explicit ``backing`` reference, so QEMU never follows a backing path
  written in an image header either.
* Every option value that comes from the spec is escaped for QEMU's option
  parser (``,`` doubled), and :func:`validate_spec` has already refused
  NUL, line breaks and relative paths, so no value can add an option.
* The full seccomp sandbox; QEMU's own ``-runas`` is *not* used (with
  ``elevateprivileges=deny`` it is killed by SIGSYS on 7.2): the launcher
  drops privileges before exec.
"""

from __future__ import annotations

import json

# The port name and the fw_cfg entry are a contract with the image and the agent.
from agentiso.protocol.guest_constants import AGENT_PORT_NAME, SECRET_FW_CFG_NAME

from .spec import (
    VirtioSerialChannel,
    VmSpec,
    VsockChannel,
    validate_spec,
)

#: ``-name`` prefix that identifies our QEMU processes in /proc (orphan scan).
PROCESS_NAME_PREFIX = "agentiso-"

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: Node/device ids used in the argv; stable so QMP commands can name them.
ROOT_DISK_NODE = "disk0"
ROOT_DISK_DEVICE = "vda"
NET_DEVICE = "net0"
CONSOLE_CHARDEV = "console"
CHANNEL_CHARDEV = "agent"
QMP_CHARDEV = "qmp"


def escape_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def process_name(vm_name: str) -> str:
    return PROCESS_NAME_PREFIX + vm_name


def _disk_args(spec: VmSpec) -> list[str]:
    """``-add-fd`` for fd layers, then blockdev pairs bottom layer first.

    QEMU resolves ``backing=<node>`` when the referencing node is created, so
    the bottom of the chain must come first; the top layer is ``disk0``.
    """
    addfd: list[str] = []
    blockdevs: list[str] = []
    n = len(spec.disks)
    for i in reversed(range(n)):
        layer = spec.disks[i]
        if layer.fd is not None:
            fdset = i + 1
            addfd += ["-add-fd", f"fd={layer.fd},set={fdset},opaque=disk-layer-{i}"]
            filename = f"/dev/fdset/{fdset}"
        else:
            assert layer.path is not None  # validate_spec guarantees one of them
            filename = layer.path
        ro = "on" if layer.read_only else "off"
        file_node = f"{ROOT_DISK_NODE}-file{i}"
        # JSON syntax: the key=value syntax cannot say "backing: null" (it would
        # name a node "null"), and without it QEMU would open the backing path
        # written in the image header itself.
        node: dict[str, object] = {
            "driver": layer.format,
            "node-name": _layer_node(i),
            "file": file_node,
            "read-only": layer.read_only,
        }
        if layer.format == "qcow2":
            node["backing"] = _layer_node(i + 1) if i + 1 < n else None
        if i == 0:
            node.update({"discard": "unmap", "detect-zeroes": "unmap"})
        fmt = json.dumps(node, separators=(",", ":"))
        blockdevs += [
            "-blockdev",
            f"driver=file,node-name={file_node},filename={escape_opt(filename)},"
            f"read-only={ro},discard=unmap",
            "-blockdev",
            fmt,
        ]
    device = ["-device", f"virtio-blk-device,drive={ROOT_DISK_NODE},id={ROOT_DISK_DEVICE}"]
    return addfd + blockdevs + device


def _layer_node(i: int) -> str:
    return ROOT_DISK_NODE if i == 0 else f"{ROOT_DISK_NODE}-layer{i}"


def _socket_chardev(chardev_id: str, path: str, listen_fd: int | None) -> str:
    """A server socket chardev: on the helper's listening fd, or created at ``path``."""
    where = f"fd={listen_fd}" if listen_fd is not None else f"path={escape_opt(path)}"
    return f"socket,id={chardev_id},{where},server=on,wait=off"


#: The id of the guest RAM's memory backend object (with a ``memory_file``).
RAM_BACKEND = "ram"


def _machine(spec: VmSpec) -> str:
    # dump-guest-core=off: a QEMU core dump must not carry the guest's memory;
    # mem-merge=off: no KSM page sharing between workspaces (dedup side channels).
    opts = ["microvm", "acpi=on", "isa-serial=on", "rtc=on", "dump-guest-core=off", "mem-merge=off"]
    if spec.memory_file is not None:
        opts.append(f"memory-backend={RAM_BACKEND}")
    if spec.accel.kind == "kvm":
        opts += ["pit=off", "pic=off"]
    return ",".join(opts)


def memory_backend(spec: VmSpec) -> str:
    """The ``-object`` value of the guest RAM in ``spec.memory_file``.

    QEMU 7.2 opens ``mem-path`` itself (read-write; its ``readonly=on`` maps
    the RAM without write access, which a guest cannot run on), so the fd is
    named through ``/proc/self/fd``.  A clone's file is a sealed memfd: the
    open succeeds, but no write, resize or shared writable mapping can change
    it, and ``share=off`` keeps the guest's writes private to this QEMU.
    """
    mf = spec.memory_file
    assert mf is not None
    share = "on" if mf.share else "off"
    # dump=off and merge=off as for anonymous RAM (see _machine).
    return (f"memory-backend-file,id={RAM_BACKEND},size={spec.memory_mib}M,"
            f"mem-path=/proc/self/fd/{mf.fd},share={share},dump=off,merge=off")


def kernel_cmdline(spec: VmSpec) -> str:
    """The guest kernel command line: the image's, with this host's TSC rate under TCG.

    An image may carry ``tsc_early_khz`` of the host it was built on; the
    host that runs the VM is the one that counts.  Under TCG a known host rate
    replaces it; under KVM (kvmclock) a foreign rate would only mislead, so it
    is dropped.  With the host rate unknown, the image's value is kept.
    """
    words = spec.cmdline.split()
    theirs = [w for w in words if w.startswith("tsc_early_khz=")]
    if spec.accel.kind == "kvm" or (theirs and spec.tsc_khz is not None):
        words = [w for w in words if not w.startswith("tsc_early_khz=")]
    if spec.accel.kind == "tcg" and spec.tsc_khz is not None:
        words.append(f"tsc_early_khz={spec.tsc_khz}")
    return " ".join(words)


def build_argv(spec: VmSpec, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    """The complete QEMU argv for ``spec``; raises InvalidVmSpec on a bad spec."""
    validate_spec(spec)
    pname = process_name(spec.name)
    argv = [
        qemu_binary,
        "-name", f"guest={pname},process={pname}",
        "-M", _machine(spec),
        "-nodefaults", "-no-user-config", "-nographic",
        "-sandbox", SANDBOX,
        "-msg", "timestamp=on",
    ]  # fmt: skip
    if spec.accel.kind == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={spec.accel.tb_size_mib}", "-cpu", "max"]
    argv += ["-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"]
    if spec.memory_file is not None:
        argv += ["-object", memory_backend(spec)]
    argv += ["-kernel", spec.kernel, "-append", kernel_cmdline(spec)]
    if spec.initrd is not None:
        argv += ["-initrd", spec.initrd]
    argv += _disk_args(spec)

    match spec.channel:
        case VirtioSerialChannel(socket_path=path, listen_fd=lfd):
            argv += [
                "-chardev", _socket_chardev(CHANNEL_CHARDEV, path, lfd),
                "-device", "virtio-serial-device,id=vser0,max_ports=2",
                "-device", f"virtserialport,bus=vser0.0,chardev={CHANNEL_CHARDEV},"
                f"name={AGENT_PORT_NAME}",
            ]  # fmt: skip
        case VsockChannel(guest_cid=cid, vhost_fd=vfd):
            dev = f"vhost-vsock-device,id=vsock0,guest-cid={cid}"
            if vfd is not None:
                dev += f",vhostfd={vfd}"
            argv += ["-device", dev]

    if spec.net is not None:
        argv += [
            "-netdev", f"tap,id={NET_DEVICE},fd={spec.net.tap_fd},vhost=off",
            "-device", f"virtio-net-device,netdev={NET_DEVICE},mac={spec.net.mac}",
        ]  # fmt: skip

    # Entropy from the host (QEMU's getrandom backend): without it the guest's
    # pool fills slowly and early programs wait for it.
    argv += ["-device", "virtio-rng-device"]

    if spec.fw_cfg_secret_file is not None:
        argv += [
            "-fw_cfg",
            f"name={SECRET_FW_CFG_NAME},file={escape_opt(spec.fw_cfg_secret_file)}",
        ]
    elif spec.fw_cfg_secret_fd is not None:
        # QEMU reads fw_cfg files by name; its own /proc/self/fd/N is the passed fd.
        argv += [
            "-fw_cfg",
            f"name={SECRET_FW_CFG_NAME},file=/proc/self/fd/{spec.fw_cfg_secret_fd}",
        ]

    argv += [
        "-chardev", _socket_chardev(CONSOLE_CHARDEV, spec.console_socket, spec.console_fd),
        "-serial", f"chardev:{CONSOLE_CHARDEV}",
        "-chardev", _socket_chardev(QMP_CHARDEV, spec.qmp_socket, spec.qmp_fd),
        "-mon", f"chardev={QMP_CHARDEV},mode=control",
    ]  # fmt: skip
    if spec.incoming is not None:
        argv += ["-incoming", "defer" if spec.incoming.fd is None else f"fd:{spec.incoming.fd}"]
    if spec.start_paused:
        argv.append("-S")
    return argv
