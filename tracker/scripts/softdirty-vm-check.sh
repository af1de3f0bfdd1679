#!/usr/bin/env bash
# Runs tracker-softdirty-check inside a Debian kernel (CONFIG_MEM_SOFT_DIRTY=y) booted under
# QEMU TCG — the check itself, then its negative control (stores made with pwrite(), which
# soft-dirty cannot see, must be caught) — and prints their HARNESS-RESULT lines.
# Exit status: 0 both pass, 1 a failure, 2 skip/no result.
#
# The kernel harness (tests/kernel-harness, suite `tracker`) is where this check runs in the
# test suite; this script remains for what the harness does not offer: several vCPUs
# (REMUS_VM_SMP, the harness boots one) and extra check options, e.g. `--no-prefault` or
# `--threads 1`, which showed that a multi-threaded collect must not take page faults.
#
# Usage: tracker/scripts/softdirty-vm-check.sh [check options, e.g. --rounds 200 --ram-mib 32]
# Env: CARGO_TARGET_DIR (build dir), REMUS_VM_SMP (default 2), REMUS_VM_TIMEOUT (s, default 900),
#      REMUS_VM_PROFILE (release, default, or debug: what the kernel harness builds).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../../tests/images/kernel.sh
source "$ROOT/tests/images/kernel.sh"

ARGS=("$@")
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

kernel_fetch >/dev/null
PROFILE=${REMUS_VM_PROFILE:-release}
case $PROFILE in
release) profile_args=(--release) ;;
debug) profile_args=() ;;
*) echo "softdirty-vm-check: REMUS_VM_PROFILE must be release or debug" >&2; exit 2 ;;
esac
(
    cd "$ROOT"
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$TARGET_DIR" \
        cargo build --quiet "${profile_args[@]}" -p remus-tracker --bin tracker-softdirty-check \
        --target x86_64-unknown-linux-gnu
)
BIN=$TARGET_DIR/x86_64-unknown-linux-gnu/$PROFILE/tracker-softdirty-check

work=$(mktemp -d /tmp/remus-softdirty-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
initramfs_base "$root"
objcopy --strip-debug "$BIN" "$root/bin/tracker-softdirty-check"
{
    echo '#!/bin/sh'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
    echo "echo \"kernel \$(uname -r)\""
    # The same per-test limit as the kernel harness.
    printf 'timeout 120 /bin/tracker-softdirty-check tracker-soft-dirty'
    [ ${#ARGS[@]} -eq 0 ] || printf ' %q' "${ARGS[@]}"
    echo
    echo 'timeout 120 /bin/tracker-softdirty-check tracker-soft-dirty-negative-control'
    echo 'poweroff -f'
} >"$root/init"
chmod 755 "$root/init"
initramfs_pack "$root" "$work/initrd.img"

# The uncompressed PVH kernel boots much faster under TCG; build-guest.sh leaves one behind.
KERNEL=$REMUS_IMAGES/guest/vmlinux
[ -f "$KERNEL" ] || KERNEL=$KERNEL_VMLINUZ

timeout "${REMUS_VM_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -m 512M -smp "${REMUS_VM_SMP:-2}" \
    -nographic -no-reboot -kernel "$KERNEL" -initrd "$work/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet" </dev/null >"$work/console.log" 2>&1 || true
grep -a -E '^(kernel |precondition|tracker:|slowest|HARNESS-RESULT)' "$work/console.log" | tr -d '\r' || true
results=$(grep -a '^HARNESS-RESULT ' "$work/console.log" | tr -d '\r' || true)
if echo "$results" | grep -q ' fail '; then
    exit 1
fi
if [ "$(echo "$results" | grep -c ' pass ')" -eq 2 ]; then
    exit 0
fi
echo "softdirty-vm-check: missing pass results; console tail:" >&2
tail -20 "$work/console.log" >&2
exit 2
