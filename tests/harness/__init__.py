"""Test harnesses that start real components (QEMU guests, zfs-fuse pools)."""
