#!/bin/sh
# /init of the remus test guest (copied into the initramfs by build-guest.sh).
# Mounts the kernel filesystems, loads the virtio modules, configures the network from the
# kernel command line and runs the workload. Recognised parameters:
#   remus.mode=ticker|service|both   (default both)
#   remus.interval=MS                ticker period (default 100)
#   remus.check_every=N              ticker ticks between check lines (default 10)
#   remus.disk=PATH                  the log device (default /dev/vda)
#   remus.port=N                     service port (default 7000)
#   remus.ip=ADDR/PREFIX remus.gw=ADDR   eth0's address and default route
# Anything else on the command line (e.g. ipv6.disable=1) is the kernel's business.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

while read -r m; do
    insmod "/lib/modules/$m" || echo "init: insmod $m failed"
done </etc/modules.order

mode=both interval=100 check_every=10 disk=/dev/vda port=7000 addr= gw=
for p in $(cat /proc/cmdline); do
    case $p in
    remus.mode=*) mode=${p#*=} ;;
    remus.interval=*) interval=${p#*=} ;;
    remus.check_every=*) check_every=${p#*=} ;;
    remus.disk=*) disk=${p#*=} ;;
    remus.port=*) port=${p#*=} ;;
    remus.ip=*) addr=${p#*=} ;;
    remus.gw=*) gw=${p#*=} ;;
    esac
done

ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    [ -n "$addr" ] && ip addr add "$addr" dev eth0
    [ -n "$gw" ] && ip route add default via "$gw"
fi

# The disk may appear a moment after its driver loads.
i=0
while [ ! -b "$disk" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done

echo "init: starting remus-guest mode=$mode"
/bin/remus-guest --mode "$mode" --interval-ms "$interval" --check-every "$check_every" \
    --disk "$disk" --port "$port" </dev/console >/dev/console 2>&1
echo "init: remus-guest exited with status $?"
poweroff -f
