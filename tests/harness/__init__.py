"""Test harnesses that start real components (QEMU guests, zfs-fuse pools).

Boot harness (guest images; see docs/images.md):

* :mod:`tests.harness.images`   find a built image, ``require_image`` (skips when it
  is not built or QEMU is missing);
* :mod:`tests.harness.qemu`     the pure QEMU microvm command line;
* :mod:`tests.harness.vm`       ``boot_vm(image, workdir) -> BootedVM`` (a context
  manager: console file, agent channel socket, stop by pid);
* :mod:`tests.harness.fixtures` ``vm_fixture("minimal", scope="module")``.

    from tests.harness.images import require_image
    from tests.harness.vm import boot_vm

    with boot_vm(require_image("minimal"), tmp_path) as vm:
        vm.wait_for_console("agentiso-init: exec")
        sock = vm.connect_channel()

``boot_vm`` also takes an image directory (``image_dir("minimal")``) and skips the
test itself when that image is not built.

The production VM engine (privhelper/vm) owns launching VMs for real; the boot
harness only serves tests and benchmarks.
"""
