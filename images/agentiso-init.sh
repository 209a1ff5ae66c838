#!/bin/sh
# /sbin/agentiso-init: the guest's init, run as PID 1 by the initramfs.
# Mounts the API filesystems, brings up lo, grows the root filesystem to the disk,
# then execs the agent so that it is PID 1 (it reaps zombies and never exits).
# Contract: exports AGENTISO_INIT_T0 (seconds since boot, from /proc/uptime, when
# this script started) for the agent's boot timings.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
read -r AGENTISO_INIT_T0 _ < /proc/uptime
export AGENTISO_INIT_T0
echo "agentiso-init: started at ${AGENTISO_INIT_T0}s"

mountpoint -q /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mountpoint -q /dev || mount -t devtmpfs -o nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mountpoint -q /run || mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mountpoint -q /tmp || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mkdir -p /run/lock

ip link set lo up

# Grow the root filesystem when the disk is larger than it was at the last resize
# (a fresh image records its own size), so an unchanged boot skips resize2fs.
root_dev=/dev/vda
sectors=$(cat /sys/block/vda/size 2>/dev/null || echo 0)
stamp=/var/lib/agentiso/rootfs-sectors
if [ "$sectors" != "$(cat "$stamp" 2>/dev/null)" ]; then
    if resize2fs "$root_dev" >/dev/null 2>&1; then
        echo "$sectors" > "$stamp"
        echo "agentiso-init: root filesystem grown to $((sectors / 2048)) MiB"
    else
        echo "agentiso-init: resize2fs $root_dev failed"
    fi
fi

echo "agentiso-init: exec python3 -m agentiso.guest"
cd /
exec python3 -m agentiso.guest
