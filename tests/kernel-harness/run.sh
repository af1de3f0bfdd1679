#!/usr/bin/env bash
# Runs test programs inside a real Debian kernel under QEMU TCG and reports per-test results.
#
#   tests/kernel-harness/run.sh [SUITE...]     (default: every suites/*.sh)
#
# Each suite (suites/NAME.sh, see README.md) names the kernel modules it needs and the test
# programs to put in the initramfs. Inside the guest, /init loads the modules and runs every
# test of every program (`PROG --list`, then `PROG TEST`), each printing one line
#   HARNESS-RESULT <test> pass|fail|skip <detail>
# The host prints a table and the closing line "N passed, N failed, N skipped", and exits
# non-zero on any failure, on a test without a result, or if the kernel never finished.
#
# Environment: REMUS_HARNESS_TIMEOUT (seconds for the whole boot, default 600),
# REMUS_HARNESS_TARGET_DIR (cargo target dir for the static builds, default
# target/kernel-harness: separate so host builds are not invalidated), REMUS_HARNESS_KEEP=1
# (keep the work directory and log).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../images/kernel.sh
source "$ROOT/tests/images/kernel.sh"

TIMEOUT=${REMUS_HARNESS_TIMEOUT:-600}
TARGET_DIR=${REMUS_HARNESS_TARGET_DIR:-$ROOT/target/kernel-harness}
TRIPLE=x86_64-unknown-linux-gnu

WORK=$(mktemp -d /tmp/remus-kernel-harness.XXXXXX)
cleanup() { [ "${REMUS_HARNESS_KEEP:-0}" = 1 ] && echo "kernel-harness: kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
ROOTFS=$WORK/root

# --- suite API -----------------------------------------------------------------------------
HARNESS_MODULES=()
HARNESS_CARGO=()    # "package:bin:features" triples, built statically
HARNESS_PROGRAMS=() # prebuilt static programs (paths)
harness_modules() { HARNESS_MODULES+=("$@"); }
harness_cargo_bin() { HARNESS_CARGO+=("$1:$2:${3:-}"); }
harness_program() { HARNESS_PROGRAMS+=("$1"); }

suites=("$@")
if [ ${#suites[@]} -eq 0 ]; then
    for f in "$HERE"/suites/*.sh; do suites+=("$(basename "$f" .sh)"); done
fi
for s in "${suites[@]}"; do
    f=$HERE/suites/$s.sh
    [ -f "$f" ] || { echo "kernel-harness: no suite $s ($f)" >&2; exit 2; }
    # shellcheck disable=SC1090
    source "$f"
done

# --- build -----------------------------------------------------------------------------------
t0=$(date +%s)
kernel_fetch
initramfs_base "$ROOTFS"
mkdir -p "$ROOTFS/harness/bin" "$ROOTFS/harness/modules"

if [ ${#HARNESS_CARGO[@]} -gt 0 ]; then
    echo "kernel-harness: building ${HARNESS_CARGO[*]} (static, $TARGET_DIR)" >&2
    # One cargo run per binary: `--features PKG/FEAT` does not satisfy a binary's
    # required-features (cargo checks them against the bare feature names).
    for pbf in "${HARNESS_CARGO[@]}"; do
        IFS=: read -r pkg bin features <<<"$pbf"
        args=(-p "$pkg" --bin "$bin")
        [ -z "$features" ] || args+=(--features "$features")
        (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$TARGET_DIR" \
            cargo build --quiet --target "$TRIPLE" "${args[@]}")
        HARNESS_PROGRAMS+=("$TARGET_DIR/$TRIPLE/debug/$bin")
    done
fi
for p in "${HARNESS_PROGRAMS[@]}"; do
    if readelf -l "$p" 2>/dev/null | grep -q "program interpreter"; then
        echo "kernel-harness: $p is dynamically linked; the initramfs has no libc" >&2
        exit 2
    fi
    objcopy --strip-debug "$p" "$ROOTFS/harness/bin/$(basename "$p")"
done

: >"$ROOTFS/harness/modules.list"
if [ ${#HARNESS_MODULES[@]} -gt 0 ]; then
    mapfile -t kos < <(kernel_modules $(printf '%s\n' "${HARNESS_MODULES[@]}" | sort -u))
    for ko in "${kos[@]}"; do
        cp "$ko" "$ROOTFS/harness/modules/"
        echo "$(basename "$ko")" >>"$ROOTFS/harness/modules.list"
    done
fi

cat >"$ROOTFS/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
for m in $(cat /harness/modules.list); do
    insmod "/harness/modules/$m" 2>/tmp/insmod.err || echo "HARNESS-MODULE-FAILED $m $(cat /tmp/insmod.err)"
done
echo "HARNESS-BOOTED $(uname -r)"
for prog in /harness/bin/*; do
    [ -x "$prog" ] || continue
    for t in $("$prog" --list); do
        timeout 120 "$prog" "$t" >/tmp/out 2>/tmp/err
        rc=$?
        line=$(grep '^HARNESS-RESULT ' /tmp/out | tail -n 1)
        if [ -n "$line" ]; then
            echo "$line"
        else
            echo "HARNESS-RESULT $t fail exited with status $rc without a result: $(tail -c 400 /tmp/err | tr '\n' ' ')"
        fi
    done
done
echo HARNESS-DONE
poweroff -f
INIT
chmod +x "$ROOTFS/init"
initramfs_pack "$ROOTFS" "$WORK/initrd.gz"
t1=$(date +%s)

# --- boot ------------------------------------------------------------------------------------
LOG=$WORK/console.log
echo "kernel-harness: booting $KERNEL_RELEASE (build took $((t1 - t0)) s, timeout $TIMEOUT s)" >&2
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 512M -smp 1 -nographic -no-reboot \
    -kernel "$KERNEL_VMLINUZ" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet" </dev/null >"$LOG" 2>&1
qrc=$?
set -e
t2=$(date +%s)
tr -d '\r' <"$LOG" >"$LOG.clean"

# --- report ----------------------------------------------------------------------------------
pass=0 fail=0 skip=0
printf '%-34s %-5s %s\n' TEST RESULT DETAIL
while read -r _ name result detail; do
    printf '%-34s %-5s %s\n' "$name" "$result" "$detail"
    case $result in
    pass) pass=$((pass + 1)) ;;
    skip) skip=$((skip + 1)) ;;
    *) fail=$((fail + 1)) ;;
    esac
done < <(grep '^HARNESS-RESULT ' "$LOG.clean" || true)
while read -r _ mod rest; do
    printf '%-34s %-5s %s\n' "insmod:$mod" fail "$rest"
    fail=$((fail + 1))
done < <(grep '^HARNESS-MODULE-FAILED ' "$LOG.clean" || true)
if ! grep -q '^HARNESS-DONE' "$LOG.clean"; then
    why="the kernel never reported completion (qemu exit $qrc after $((t2 - t1)) s)"
    printf '%-34s %-5s %s\n' "harness" fail "$why"
    fail=$((fail + 1))
    echo "--- last console lines ---" >&2
    tail -n 30 "$LOG.clean" >&2
fi
if [ $((pass + fail + skip)) -eq 0 ]; then
    printf '%-34s %-5s %s\n' "harness" fail "no test reported"
    fail=1
fi
echo "kernel-harness: $KERNEL_RELEASE, boot+tests $((t2 - t1)) s, total $((t2 - t0)) s" >&2
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
