#!/usr/bin/env bash
# Builds the remus test guest: the Debian kernel (via kernel.sh) and an initramfs holding
# busybox, the virtio modules (virtio_pci, virtio_net, virtio_blk and their dependencies),
# the static remus-guest workload and guest-init.sh as /init.
#
# Output ($REMUS_IMAGES/guest, default target/remus-images/guest):
#   vmlinuz      the kernel as Debian ships it (bzImage)
#   vmlinux      the same kernel uncompressed (ELF with a PVH note): pass this one to -kernel,
#                it reaches /init in ~3 s under TCG instead of ~8 s (no decompression under
#                emulation)
#   initrd.img   the initramfs
#   inputs       the digest of everything the image was built from
# Idempotent: the image is rebuilt only when an input changed (kernel, modules, busybox,
# workload binary, init script, this script). Safe to run concurrently (flock).
#
# Boot it with e.g. -append "console=ttyS0 quiet panic=-1 remus.mode=ticker remus.interval=100"
# (see guest-init.sh for the remus.* parameters).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=kernel.sh
source "$HERE/kernel.sh"

OUT=$REMUS_IMAGES/guest
GUEST_TARGET=${REMUS_GUEST_TARGET:-$REMUS_ROOT/target/guest}
MODULES=(virtio_pci virtio_net virtio_blk)

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

kernel_fetch

# The workload: static, stripped, in its own target dir so host builds are not invalidated.
(
    cd "$REMUS_ROOT"
    RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_TARGET_DIR="$GUEST_TARGET" \
        cargo build --quiet --release -p remus-guest --target x86_64-unknown-linux-gnu
)
WORKLOAD=$GUEST_TARGET/x86_64-unknown-linux-gnu/release/remus-guest

mapfile -t MODULE_PATHS < <(kernel_modules "${MODULES[@]}")

digest=$(
    {
        echo "kernel $KERNEL_VMLINUZ"
        sha256sum "$KERNEL_VMLINUZ" /bin/busybox "$WORKLOAD" "$HERE/guest-init.sh" \
            "${BASH_SOURCE[0]}" "${MODULE_PATHS[@]}"
    } | sha256sum | cut -d' ' -f1
)
if [ -f "$OUT/inputs" ] && [ "$(cat "$OUT/inputs")" = "$digest" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initrd.img" ]; then
    echo "build-guest: $OUT is up to date" >&2
    exit 0
fi

echo "build-guest: building $OUT" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
initramfs_base "$root"
for m in "${MODULE_PATHS[@]}"; do
    cp "$m" "$root/lib/modules/"
    basename "$m" >>"$root/etc/modules.order"
done
cp "$WORKLOAD" "$root/bin/remus-guest"
cp "$HERE/guest-init.sh" "$root/init"
chmod 755 "$root/init" "$root/bin/remus-guest"
initramfs_pack "$root" "$work/initrd.img"
cp "$KERNEL_VMLINUZ" "$work/vmlinuz"
# The bzImage's payload is one xz stream; the ELF inside it boots directly via PVH.
offset=$(grep -abo $'\xfd7zXZ' "$KERNEL_VMLINUZ" | head -1 | cut -d: -f1)
if [ -z "$offset" ]; then
    echo "build-guest: no xz payload in $KERNEL_VMLINUZ" >&2
    exit 1
fi
# xz reports trailing data after the stream; the stream itself is complete.
tail -c +$((offset + 1)) "$KERNEL_VMLINUZ" | xz -dc >"$work/vmlinux" 2>/dev/null || true
if ! readelf -n "$work/vmlinux" 2>/dev/null | grep -q Xen; then
    echo "build-guest: the kernel extracted from $KERNEL_VMLINUZ is not a PVH-bootable ELF" >&2
    exit 1
fi

# Replace the outputs atomically, the digest last: a crash leaves a stale digest, not a
# matching digest over half-written images.
rm -f "$OUT/inputs"
mv "$work/vmlinuz" "$OUT/vmlinuz"
mv "$work/vmlinux" "$OUT/vmlinux"
mv "$work/initrd.img" "$OUT/initrd.img"
echo "$digest" >"$OUT/inputs"
echo "build-guest: built $OUT ($(du -h "$OUT/initrd.img" | cut -f1) initrd)" >&2
