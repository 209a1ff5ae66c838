"""Guest image build: kernel, initramfs and root filesystem under build/images/<name>/.

Run as ``python -m images.build`` from the repository root (``make image`` does
that).  The pure decisions (apt sources, cache keys, module resolution, cpio
archives, rebuild planning) live in their own modules and are unit-tested; the
build steps that run apt-get, debootstrap and mkfs.ext4 live in
:mod:`images.steps`.
"""
