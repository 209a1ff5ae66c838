"""The boot harness's pure QEMU command line (tests/harness/qemu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.qemu import AGENT_PORT_NAME, QemuConfig, qemu_argv


def cfg(**over: object) -> QemuConfig:
    base: dict[str, object] = {
        "kernel": Path("/img/vmlinuz"),
        "initrd": Path("/img/initrd.img"),
        "cmdline": "console=ttyS0 panic=-1",
        "disk": Path("/w/disk.qcow2"),
        "channel": Path("/w/agent.sock"),
        "console": Path("/w/console.log"),
    }
    base.update(over)
    return QemuConfig(**base)  # type: ignore[arg-type]


def test_microvm_tcg_bounded_with_agent_port_and_console_file() -> None:
    argv = qemu_argv(cfg())
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1] == "microvm"
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert "socket,id=agent,path=/w/agent.sock,server=on,wait=off" in argv
    assert f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}" in argv
    assert AGENT_PORT_NAME == "org.agentiso.agent.0"
    assert argv[argv.index("-serial") + 1] == "file:/w/console.log"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1"
    assert "virtio-blk-device,drive=root" in joined
    assert "virtio-rng-device" in argv


def test_memory_cpus_and_accel() -> None:
    argv = qemu_argv(cfg(memory_mib=512, cpus=2, accel="kvm"))
    assert argv[argv.index("-m") + 1] == "512"
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-accel") + 1] == "kvm"


@pytest.mark.parametrize(
    "over",
    [
        {"memory_mib": 0},
        {"memory_mib": 10**9},
        {"cpus": 0},
        {"cpus": -1},
        {"tb_size_mib": 0},
        {"accel": "hvf"},
        {"disk": Path("/w/x,readonly=off")},
        {"channel": Path("/w/a,server=off")},
        {"console": Path("/w/c,append=on")},
    ],
)
def test_bad_config_is_refused(over: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        cfg(**over)


def test_boot_vm_refuses_a_disk_smaller_than_the_image(tmp_path: Path) -> None:
    from tests.harness.images import ImageInfo
    from tests.harness.vm import HarnessError, boot_vm

    (tmp_path / "rootfs.img").write_bytes(b"\0" * 8192)
    image = ImageInfo(tmp_path, "console=ttyS0", {})
    with pytest.raises(HarnessError, match="smaller than the image"):
        boot_vm(image, tmp_path / "work", disk_size=4096)
    assert not (tmp_path / "work" / "disk.qcow2").exists()


def test_boot_vm_on_an_unbuilt_image_dir_skips_with_the_reason(tmp_path: Path) -> None:
    from tests.harness.vm import boot_vm

    with pytest.raises(pytest.skip.Exception, match=r"make image|qemu-system-x86_64"):
        boot_vm(tmp_path / "images" / "nothing", tmp_path / "work")


def test_outside_pytest_an_unbuilt_image_is_a_harness_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness.vm import HarnessError, load_image

    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    with pytest.raises(HarnessError):
        load_image(tmp_path / "nothing")
