#!/usr/bin/env bash
# Installs what remus-agent needs on a fresh Debian machine (run as root).
# Idempotent: a package that is already there is not fetched again.
set -euo pipefail

need=(qemu-system-x86 qemu-utils busybox-static iproute2 cpio xz-utils zstd binutils kmod bsdutils)
# Checked again after each install: installing one package can remove another (Debian's
# qemu-system-x86 removes a backported qemu-utils that conflicts with it, which left
# qemu-io and qemu-img missing), so the loop runs until nothing is missing.
missing_packages() {
    for p in "${need[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}
updated=no
for _ in 1 2 3; do
    mapfile -t missing < <(missing_packages)
    [ ${#missing[@]} -eq 0 ] && break
    echo "install-deps: installing ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: must run as root to install ${missing[*]}" >&2
        exit 1
    fi
    if [ "$updated" = no ]; then
        apt-get update -qq
        updated=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_packages)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: still missing after installing: ${missing[*]}" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install a Rust toolchain (1.85 or newer) first" >&2
    exit 1
fi
