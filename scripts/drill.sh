#!/usr/bin/env bash
# The main job: a local failover drill on built-in defaults. Installs what it needs (apt
# packages, the Debian guest kernel, the guest image), builds remus-drill (test tooling, not
# part of the product), remusd and remus-witness, and runs `remus-drill`: two real remusd
# daemons and a witness in network namespaces on this machine, a client sending requests
# through the primary's death.
# Extra arguments are passed on (e.g. --json, --trials 10, --scenario partition, --local).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Where install-deps puts a Rust toolchain it had to install.
export PATH="$HOME/.cargo/bin:$PATH"
bash tests/images/build-guest.sh >/dev/null
cargo build --quiet -p remus-agent -p remus-ha -p remus-drill --bins
target="${CARGO_TARGET_DIR:-target}"
"$target/debug/remus-drill" "$@"
