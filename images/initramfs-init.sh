#!/bin/sh
# agentiso initramfs /init (busybox sh, PID 1).
# Loads the virtio/vsock/fw_cfg/rng modules listed in /etc/modules-load.order, mounts
# the root disk (first virtio-blk device, no partition table), mounts the API
# filesystems into it and switch_roots into /sbin/agentiso-init.
# The API filesystems are mounted here because busybox is static: under TCG every
# exec of a dynamically linked program costs tens of milliseconds of ld.so work.
# Kernel command line knobs: agentiso.root=DEV (default /dev/vda),
# agentiso.rootfstype=T (default ext4), agentiso.init=PATH.
# On any failure it says why on the console and powers off, so a host never waits
# on a VM that cannot boot.
# /bin holds busybox and a link per applet (made at build time, not here).
export PATH=/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t devtmpfs -o nosuid devtmpfs /dev
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys

fail() {
    echo "agentiso-initramfs: FATAL: $*"
    sleep 1
    poweroff -f
}

root=/dev/vda
fstype=ext4
init=/sbin/agentiso-init
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        agentiso.root=*) root="${arg#agentiso.root=}" ;;
        agentiso.rootfstype=*) fstype="${arg#agentiso.rootfstype=}" ;;
        agentiso.init=*) init="${arg#agentiso.init=}" ;;
    esac
done

# /etc/modules-load.order: "<condition> <module path>" in dependency order; the
# condition is "always" or the virtio device ids (as sysfs prints them) a module
# serves.  Load the unconditional ones (virtio-mmio among them, which registers the
# VM's virtio devices), then only the drivers of devices this VM has: no vsock
# modules, hence no /dev/vsock, on a VM without a vsock device.
load() {
    insmod "/lib/modules/$1" 2>/dev/null || echo "agentiso-initramfs: could not load $1"
}
while read -r cond mod; do
    [ "$cond" = always ] && load "$mod"
done < /etc/modules-load.order
present=" "
for dev in /sys/bus/virtio/devices/*/device; do
    [ -r "$dev" ] && read -r id < "$dev" && present="$present$id "
done
while read -r cond mod; do
    [ "$cond" = always ] && continue
    # Split on ',' in the shell itself: a subshell per line costs a fork under TCG.
    IFS=,
    set -- $cond
    IFS=' 	
'
    for id in "$@"; do
        case "$present" in
            *" $id "*) load "$mod"; break ;;
        esac
    done
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

mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
for d in run tmp; do
    [ -d "/newroot/$d" ] || mkdir -p "/newroot/$d"
done
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /newroot/run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /newroot/tmp
mkdir -p /newroot/run/lock
ln -s /proc/self/fd /dev/fd
ip link set lo up
# Moving a mount moves the mounts below it (/dev/pts, /dev/shm) along.
for d in dev proc sys; do
    mount --move "/$d" "/newroot/$d" || fail "cannot move /$d into the root filesystem"
done
exec switch_root /newroot "$init"
