#!/usr/bin/env bash
# The false-failover soak: a protected pair at the product's default heartbeat and lease
# settings, with every core of this machine saturated by busy loops, for 300 s (or the
# number of seconds given). Passes only with zero failovers, zero lost protection and zero
# pauses; prints checkpoints acknowledged, pause/ACK percentiles and the longest silence of
# the replication stream it sampled. The test suite runs the same test for 60 s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
bash tests/images/build-guest.sh >/dev/null
REMUS_BUSY_SECS="${1:-300}" cargo test -p remus-drill --test pair_busy_hosts -- --nocapture
