#!/usr/bin/env bash
# Installs what remus-agent needs on a fresh Debian machine (run as root).
# Idempotent: a package that is already there is not fetched again.
set -euo pipefail

# lintian: the package test (dist/tests/package.rs) runs it on the built .deb.
# libvirt-clients (virsh) and virtinst (virt-install): agent/tests/domain_import.rs makes
# libvirt definitions with them at test time (libvirt's test driver: no daemon) for
# `remusctl domain import`.
# protobuf-compiler (protoc): the etcd v3 client crate (etcd-client) generates its gRPC code
# from etcd's .proto files at build time. etcd-server and etcd-client (etcd, etcdctl): the
# etcd arbiter's tests and the pair drill's etcd backend start a real etcd of their own on
# a random port (the packaged service is not used; see below).
need=(qemu-system-x86 qemu-utils busybox-static iproute2 cpio xz-utils zstd binutils kmod bsdutils lintian libvirt-clients virtinst protobuf-compiler etcd-server etcd-client openssl)
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
    # Together first; if apt's resolver refuses the set ("generated breaks": seen on a
    # machine with a backported qemu-utils), one package at a time, and the loop re-checks.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; then
        echo "install-deps: installing the set failed; installing one at a time" >&2
        for p in "${missing[@]}"; do
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "$p" >/dev/null || echo "install-deps: installing $p failed" >&2
        done
    fi
done
mapfile -t missing < <(missing_packages)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: still missing after installing: ${missing[*]}" >&2
    exit 1
fi
# Debian starts etcd-server's own service where systemd runs: the tests never use it (they
# start etcd on random ports in temporary directories), so it is not left listening.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet etcd 2>/dev/null; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
# A Rust toolchain: Debian 12's cargo (1.63) is too old for this workspace, so a missing
# cargo is installed with rustup (stable, with rustfmt and clippy for .ci/run) into
# ~/.cargo; scripts/test.sh, scripts/drill.sh and .ci/run put ~/.cargo/bin on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: installing a Rust toolchain with rustup (stable, minimal profile)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        curl ca-certificates gcc libc6-dev >/dev/null
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --component rustfmt,clippy >/dev/null
    command -v cargo >/dev/null 2>&1 || {
        echo "install-deps: rustup finished but cargo is still not on PATH" >&2
        exit 1
    }
fi
