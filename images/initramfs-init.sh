#!/bin/sh
# agentiso initramfs /init (busybox sh, PID 1).
# Loads the virtio/vsock/fw_cfg modules listed in /etc/modules-load.order, mounts
# the root disk (first virtio-blk device, no partition table) and switch_roots into
# /sbin/agentiso-init.  Kernel command line knobs: agentiso.root=DEV (default
# /dev/vda), agentiso.rootfstype=T (default ext4), agentiso.init=PATH.
# On any failure it says why on the console and powers off, so a host never waits
# on a VM that cannot boot.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin

fail() {
    echo "agentiso-initramfs: FATAL: $*"
    sleep 1
    poweroff -f
}

root=/dev/vda
fstype=ext4
init=/sbin/agentiso-init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        agentiso.root=*) root="${arg#agentiso.root=}" ;;
        agentiso.rootfstype=*) fstype="${arg#agentiso.rootfstype=}" ;;
        agentiso.init=*) init="${arg#agentiso.init=}" ;;
    esac
done

while read -r mod; do
    [ -n "$mod" ] || continue
    # A module that fails to load (e.g. vsock transport without a device) is not fatal.
    insmod "/lib/modules/$mod" 2>/dev/null || echo "agentiso-initramfs: could not load $mod"
done < /etc/modules-load.order

# The virtio-mmio device probe is asynchronous; wait up to ~5 s for the disk.
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ "$i" -le 500 ] || fail "root device $root did not appear"
    usleep 10000
done

mount -t "$fstype" -o rw "$root" /newroot || fail "cannot mount $root"
[ -x "/newroot$init" ] || fail "$init is missing in the root filesystem"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc
exec switch_root /newroot "$init"
