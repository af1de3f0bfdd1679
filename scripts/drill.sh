#!/usr/bin/env bash
# The main job: a local failover drill on built-in defaults. Installs what it needs (apt
# packages, the Debian guest kernel, the guest image), builds remusctl and runs
# `remusctl drill`; extra arguments are passed on (e.g. --json, --checkpoints 50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash tests/images/build-guest.sh >/dev/null
cargo build --quiet -p remus-agent --bin remusctl
target/debug/remusctl drill "$@"
