#!/usr/bin/env bash
# Prints the blk-remus write benchmark table: qemu-img bench on a raw file, on our NBD server
# without replication, and through the replicated NBD path (primary + in-process backup
# committing every 200 ms), measured side by side in one run. Extra args go to the binary
# (--size-mib, --count, --depth, --interval-ms, --dir).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "bench.sh: qemu-img not found (install qemu-utils)" >&2; exit 1; }
# The workspace's dev profile already optimises (opt-level 1, dependencies at 3); set
# BENCH_PROFILE=release for a fully optimised build.
profile="${BENCH_PROFILE:-dev}"
cargo build -q --profile "$profile" -p blk-remus --bin blk-remus-bench
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
exe="${CARGO_TARGET_DIR:-target}/$dir/blk-remus-bench"
exec "$exe" "$@"
