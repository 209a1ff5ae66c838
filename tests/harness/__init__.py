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

Two ways to boot, one rule for choosing:

* :mod:`tests.harness.engine`  ``engine_vm`` / ``engine_vm_fixture``: the real VM
  engine (privhelper/vm) launches QEMU as in production.  Every test of the agent
  or of the helper boots this way.
* :mod:`tests.harness.vm`      ``boot_vm``: a raw QEMU command line, only for tests
  about the image itself (its boot chain, its contents) and the harness itself.

Skipping when an image is missing is :func:`tests.harness.images.require_image`
(or ``skip_unless_image()`` for a module), and nothing else.
"""
