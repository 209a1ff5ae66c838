"""The QEMU command line for a test boot (pure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agentiso.protocol.guest_constants import AGENT_PORT_NAME

__all__ = ["AGENT_PORT_NAME", "QemuConfig", "qemu_argv"]


@dataclasses.dataclass(frozen=True)
class QemuConfig:
    """Everything the command line depends on; paths are used verbatim."""

    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    channel: Path
    console: Path
    memory_mib: int = 256
    cpus: int = 1
    #: TCG translation cache bound: the default (1 GiB on 64-bit hosts) is far too
    #: much for many small VMs on a shared machine.
    tb_size_mib: int = 64
    accel: str = "tcg"

    def __post_init__(self) -> None:
        if not 64 <= self.memory_mib <= 65536:
            raise ValueError(f"memory_mib {self.memory_mib} out of range 64..65536")
        if not 1 <= self.cpus <= 64:
            raise ValueError(f"cpus {self.cpus} out of range 1..64")
        if not 1 <= self.tb_size_mib <= 4096:
            raise ValueError(f"tb_size_mib {self.tb_size_mib} out of range 1..4096")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"accel {self.accel!r} is not tcg or kvm")
        for name in ("kernel", "initrd", "disk", "channel", "console"):
            # QEMU's option syntax uses ',' as separator: such a path would inject options.
            if "," in str(getattr(self, name)):
                raise ValueError(f"{name} path contains ',': {getattr(self, name)}")


def qemu_argv(cfg: QemuConfig, qemu: str = "qemu-system-x86_64") -> list[str]:
    """argv for a microvm with virtio-mmio disk and agent port, console to a file.

    ``-no-reboot`` turns a guest reboot or panic (the image's cmdline sets panic=-1,
    reboot=t) into QEMU exiting, so a dead guest is a dead process.
    """
    accel = f"tcg,tb-size={cfg.tb_size_mib}" if cfg.accel == "tcg" else "kvm"
    return [
        qemu,
        "-M", "microvm",
        "-accel", accel,
        "-m", str(cfg.memory_mib),
        "-smp", str(cfg.cpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", cfg.cmdline,
        "-drive", f"id=root,file={cfg.disk},format=qcow2,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={cfg.channel},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        # Host entropy: without it the guest's first getrandom() blocks ~1 s under TCG.
        "-device", "virtio-rng-device",
        "-serial", f"file:{cfg.console}",
    ]  # fmt: skip
