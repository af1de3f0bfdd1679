#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, runs every test (unit, integration,
# real-kernel harness, end to end) and prints a summary. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --no-fail-fast
