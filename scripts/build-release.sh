#!/usr/bin/env bash
# Builds the binaries of a past release (remusd, remusctl, remus-witness) from this
# repository's history, by the commit RELEASES records for it, and prints the directory
# that holds them (the last line of stdout; everything else goes to stderr).
#
#   bash scripts/build-release.sh v0.1.0
#
# The source is the commit's tree (`git archive`, so nothing is registered in the repository),
# built with its own Cargo.lock (`--locked`) and its own target directory under the cache
# directory, `$REMUS_RELEASE_CACHE` (default `target/releases`), one folder per version.
# A second run reuses the binaries when the folder's stamp names the same commit. A commit
# that this clone does not hold is an error (a shallow clone cannot run the mixed-version
# test), never a skip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:?usage: build-release.sh VERSION (as in RELEASES, e.g. v0.1.0)}"
commit="$(awk -v v="$version" '$1 == v { print $2; exit }' "$root/RELEASES")"
if [ -z "$commit" ]; then
    echo "build-release: $version is not in $root/RELEASES" >&2
    exit 1
fi
if ! git -C "$root" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "build-release: commit $commit of $version is not in this clone's history" \
        "(a shallow clone? run: git fetch --unshallow)" >&2
    exit 1
fi
cache="${REMUS_RELEASE_CACHE:-$root/target/releases}/$version"
bins=(remusd remusctl remus-witness)
have_all() {
    for b in "${bins[@]}"; do [ -x "$cache/bin/$b" ] || return 1; done
}
if [ "$(cat "$cache/stamp" 2>/dev/null)" = "$commit" ] && have_all; then
    echo "build-release: $version ($commit) cached in $cache/bin" >&2
    echo "$cache/bin"
    exit 0
fi
start=$(date +%s)
rm -rf "$cache/src" "$cache/bin" "$cache/stamp"
mkdir -p "$cache/src" "$cache/bin"
git -C "$root" archive --format=tar "$commit" | tar -x -C "$cache/src"
echo "build-release: building $version ($commit) in $cache" >&2
# Only the release's own settings: nothing of the calling build (a cargo test run sets
# these) may leak into it.
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_MANIFEST_DIR CARGO_PKG_NAME
CARGO_TARGET_DIR="$cache/target" CARGO_INCREMENTAL=0 \
    cargo build --quiet --locked --manifest-path "$cache/src/Cargo.toml" \
    -p remus-agent --bin remusd --bin remusctl -p remus-ha --bin remus-witness >&2
for b in "${bins[@]}"; do
    cp "$cache/target/debug/$b" "$cache/bin/$b"
done
# The build directory is not needed once the binaries are copied out; keep it only when
# asked (a rebuild at another commit would reuse its dependencies).
if [ "${REMUS_RELEASE_KEEP_TARGET:-0}" != 1 ]; then
    rm -rf "$cache/target"
fi
echo "$commit" >"$cache/stamp"
echo "build-release: $version built in $(($(date +%s) - start)) s" >&2
echo "$cache/bin"
