#!/usr/bin/env bash
# Installs what remus-agent needs on a fresh Debian machine (run as root).
# Idempotent: a package that is already there is not fetched again.
set -euo pipefail

need=(qemu-system-x86 qemu-utils busybox-static iproute2 cpio xz-utils zstd binutils kmod bsdutils)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: must run as root to install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install a Rust toolchain (1.85 or newer) first" >&2
    exit 1
fi
