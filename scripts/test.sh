#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, runs every test (unit, integration,
# real-kernel harness, end to end) and prints a summary. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Where install-deps puts a Rust toolchain it had to install.
export PATH="$HOME/.cargo/bin:$PATH"
# One build, run once: incremental state would only double the target directory (it was
# 3.7 of 9.3 GB, and CI's disk is small). Set CARGO_INCREMENTAL=1 to keep it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The mixed-version pair test (drill/tests/pair_mixed_versions.rs) runs v0.1.0's remusd
# beside this one: its binaries are built here from git history (scripts/build-release.sh,
# cached under target/releases), so the extra build time is printed in the suite's log. A
# failure here does not stop the suite: that test then fails, with the script's reason.
release_start=$(date +%s)
if bash scripts/build-release.sh v0.1.0 >/dev/null; then
    echo "test.sh: v0.1.0 binaries ready in $(($(date +%s) - release_start)) s" >&2
else
    echo "test.sh: building v0.1.0 failed after $(($(date +%s) - release_start)) s" \
        "(pair_mixed_versions will fail)" >&2
fi
cargo test --workspace --no-fail-fast
