#!/usr/bin/env bash
# Builds the Debian package remus-agent_<version>_<arch>.deb with dpkg-deb: the three
# binaries (stripped), the systemd unit, an example /etc/remus/remus.toml (a conffile: an
# upgrade never overwrites the operator's policy), the docs, man pages and remusctl's
# completions (generated from the clap definitions by remus-dist).
#
#   bash scripts/build-deb.sh [--out DIR] [--bin-dir DIR]
#
# Without --bin-dir it builds a release; with it, it packages the binaries found there
# (the test suite passes its debug build, so CI compiles nothing twice). No maintainer
# scripts: installing the package does not enable or start the unit (the policy must be
# written first); `systemctl enable --now remusd` does.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/debian
bin_dir=
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        *) echo "build-deb: unknown argument $1 (expected --out DIR or --bin-dir DIR)" >&2; exit 2 ;;
    esac
done

if [ -z "$bin_dir" ]; then
    cargo build --release -p remus-agent -p remus-ha -p remus-dist --bins
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
for b in remusd remusctl remus-witness remus-dist; do
    [ -x "$bin_dir/$b" ] || { echo "build-deb: $bin_dir/$b missing (build it first)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
pkg=remus-agent
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
doc="$root/usr/share/doc/$pkg"

install -d "$root/DEBIAN" "$root/usr/sbin" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/etc/remus" "$doc/examples" "$root/usr/share/man" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
# Stripped as dh_strip would: the debug build is large, and a package ships no symbols.
install -m 0755 "$bin_dir/remusd" "$bin_dir/remus-witness" "$root/usr/sbin/"
install -m 0755 "$bin_dir/remusctl" "$root/usr/bin/"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$root/usr/sbin/remusd" "$root/usr/sbin/remus-witness" "$root/usr/bin/remusctl"
install -m 0644 configs/remusd.service "$root/lib/systemd/system/remusd.service"
install -m 0644 configs/minimal.toml "$root/etc/remus/remus.toml"
install -m 0644 configs/minimal.toml configs/full.toml "$doc/examples/"
install -m 0644 README.md docs/*.md "$doc/"

"$bin_dir/remus-dist" man "$stage/man" >/dev/null
for f in "$stage"/man/man*/*; do
    sec=$(basename "$(dirname "$f")")
    install -d "$root/usr/share/man/$sec"
    gzip -9n < "$f" > "$root/usr/share/man/$sec/$(basename "$f").gz"
done
"$bin_dir/remus-dist" completions "$stage/compl" >/dev/null
install -m 0644 "$stage/compl/bash/remusctl.bash" "$root/usr/share/bash-completion/completions/remusctl"
install -m 0644 "$stage/compl/zsh/_remusctl" "$root/usr/share/zsh/vendor-completions/_remusctl"
install -m 0644 "$stage/compl/fish/remusctl.fish" "$root/usr/share/fish/vendor_completions.d/remusctl.fish"

cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: remus-agent
Source: https://github.com/remus-agent/remus-agent

Files: *
Copyright: 2026 the remus-agent maintainers
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
# A native package (no Debian revision): its changelog is changelog.gz.
gzip -9n > "$doc/changelog.gz" <<EOF
$pkg ($version) unstable; urgency=medium

  * Package built from the remus-agent source tree (scripts/build-deb.sh).

 -- remus-agent maintainers <maintainers@remus-agent.invalid>  $(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")
EOF
find "$root/usr/share" "$root/etc" "$root/lib" -type f -exec chmod 0644 {} +
find "$root" -type d -exec chmod 0755 {} +

echo /etc/remus/remus.toml > "$root/DEBIAN/conffiles"
installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: remus-agent maintainers <maintainers@remus-agent.invalid>
Installed-Size: $installed_kb
Depends: libc6 (>= 2.34), libgcc-s1 (>= 4.2), qemu-system-x86, qemu-utils, iproute2
Section: admin
Priority: optional
Homepage: https://github.com/remus-agent/remus-agent
Description: keeps a QEMU virtual machine running through the loss of its host
 remusd protects QEMU VMs by continuous checkpointing (the Remus technique):
 every epoch the primary pauses the VM, captures dirty pages and device state,
 resumes it and streams the checkpoint to its peer; network output and disk
 writes are held until the backup acknowledges. When the primary's host is
 lost, the backup fences it (witness lease or command) and resumes the VM
 from the last committed checkpoint. remusctl is the operator's command line;
 remus-witness arbitrates between the two hosts.
EOF
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/${pkg}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
