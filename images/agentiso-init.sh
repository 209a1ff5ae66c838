#!/bin/sh
# /sbin/agentiso-init: the guest's init, run as PID 1 by the initramfs.
# Mounts the API filesystems (/proc /sys /dev /dev/pts /dev/shm /run /tmp) that are
# not mounted yet (the agentiso initramfs mounts them all), brings up lo, grows the
# root filesystem to the disk, then execs the agent so that it is PID 1 (it reaps
# zombies and never exits).
# Contract: exports AGENTISO_INIT_T0 (seconds since boot, from /proc/uptime, when
# this script started) for the agent's boot timings.
# Only shell builtins run unless there is work to do: under TCG every exec of a
# dynamically linked program costs tens of milliseconds.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -r /proc/uptime ] || mount -t proc -o nosuid,nodev,noexec proc /proc
read -r AGENTISO_INIT_T0 _ < /proc/uptime
export AGENTISO_INIT_T0
echo "agentiso-init: started at ${AGENTISO_INIT_T0}s"

mounted=" "
while read -r _ mp _; do
    mounted="$mounted$mp "
done < /proc/mounts
ensure_mounted() {  # ensure_mounted MOUNTPOINT TYPE OPTIONS
    case "$mounted" in
        *" $1 "*) ;;
        *) [ -d "$1" ] || mkdir -p "$1"; mount -t "$2" -o "$3" "$2" "$1" ;;
    esac
}
ensure_mounted /sys sysfs nosuid,nodev,noexec
ensure_mounted /dev devtmpfs nosuid
ensure_mounted /dev/pts devpts nosuid,noexec,gid=5,mode=620,ptmxmode=666
ensure_mounted /dev/shm tmpfs nosuid,nodev,mode=1777
ensure_mounted /run tmpfs nosuid,nodev,mode=755
ensure_mounted /tmp tmpfs nosuid,nodev,mode=1777
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
[ -d /run/lock ] || mkdir -p /run/lock

# The kernel's hostname from /etc/hostname (the agent may change both later).
if read -r name < /etc/hostname && [ -n "$name" ]; then
    echo "$name" > /proc/sys/kernel/hostname
fi

read -r lo_flags < /sys/class/net/lo/flags
[ $((lo_flags & 1)) = 1 ] || ip link set lo up  # IFF_UP

# Grow the root filesystem when the disk is larger than it was at the last resize
# (a fresh image records its own size), so an unchanged boot skips resize2fs.
root_dev=/dev/vda
sectors=0
[ -r /sys/block/vda/size ] && read -r sectors < /sys/block/vda/size
stamp=/var/lib/agentiso/rootfs-sectors
recorded=
[ -r "$stamp" ] && read -r recorded < "$stamp"
if [ "$sectors" != "$recorded" ] && [ "$sectors" != 0 ]; then
    if resize2fs "$root_dev" >/dev/null 2>&1; then
        echo "$sectors" > "$stamp"
        echo "agentiso-init: root filesystem grown to $((sectors / 2048)) MiB"
    else
        echo "agentiso-init: resize2fs $root_dev failed"
    fi
fi

# Python seeds its hash randomisation from /dev/urandom at start-up, and before the
# kernel's entropy pool is ready that read waits for jitter entropy: about a second
# under TCG when the VM has no virtio-rng device.  The kernel's per-boot random
# boot_id (made without waiting) seeds it instead.
if [ -z "${PYTHONHASHSEED:-}" ] && read -r boot_id < /proc/sys/kernel/random/boot_id; then
    PYTHONHASHSEED=$((0x${boot_id%%-*}))
    export PYTHONHASHSEED
fi

# -S: no site module (its .pth scan, sitecustomize and apport hook); the one
# directory the agent needs is added by hand.  -c rather than -m: no runpy.
# What ``python3 -m agentiso.guest`` would do, a few hundred ms sooner under TCG.
read -r now _ < /proc/uptime
echo "agentiso-init: exec python3 -m agentiso.guest (as python3 -S -c) at ${now}s"
cd /
exec python3 -S -c 'import sys; sys.path.append("/usr/lib/python3/dist-packages"); import agentiso.guest.__main__'
