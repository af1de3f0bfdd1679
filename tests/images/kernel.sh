#!/usr/bin/env bash
# Shared helpers for booting a real Debian kernel under QEMU TCG: fetch the kernel package
# with apt, resolve module dependencies without kmod, and pack an initramfs.
#
# Source this file; it defines functions and REMUS_IMAGES (the cache directory).
#   kernel_fetch              -> sets KERNEL_DIR (extracted package), KERNEL_VMLINUZ, KERNEL_RELEASE
#   kernel_modules NAME...    -> prints the .ko paths for NAME and all its dependencies, in load order
#   initramfs_pack DIR OUT    -> packs DIR as a gzip'd newc cpio archive at OUT
#   initramfs_base DIR        -> populates DIR with busybox and its applet links

REMUS_ROOT=${REMUS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
REMUS_IMAGES=${REMUS_IMAGES:-$REMUS_ROOT/target/remus-images}

kernel_fetch() {
    mkdir -p "$REMUS_IMAGES"
    local pkg
    pkg=${REMUS_KERNEL_PACKAGE:-}
    if [ -z "$pkg" ]; then
        # The newest linux-image the machine's apt lists knows; fall back to a cached one
        # when apt has no lists (offline re-runs).
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    if [ -z "$pkg" ]; then
        pkg=$(ls -d "$REMUS_IMAGES"/kernel-linux-image-* 2>/dev/null | head -1 | sed 's|.*/kernel-||')
    fi
    if [ -z "$pkg" ]; then
        echo "kernel_fetch: no linux-image package known to apt (run apt-get update)" >&2
        return 1
    fi
    KERNEL_DIR=$REMUS_IMAGES/kernel-$pkg
    if [ ! -f "$KERNEL_DIR/.complete" ]; then
        echo "kernel_fetch: downloading $pkg" >&2
        local tmp
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || {
            echo "kernel_fetch: apt-get download $pkg failed" >&2
            rm -rf "$tmp"
            return 1
        }
        rm -rf "$KERNEL_DIR"
        mkdir -p "$KERNEL_DIR"
        dpkg -x "$tmp"/*.deb "$KERNEL_DIR"
        rm -rf "$tmp"
        touch "$KERNEL_DIR/.complete"
    fi
    KERNEL_VMLINUZ=$(ls "$KERNEL_DIR"/boot/vmlinuz-* | head -1)
    KERNEL_RELEASE=${KERNEL_VMLINUZ##*/vmlinuz-}
    export KERNEL_DIR KERNEL_VMLINUZ KERNEL_RELEASE
}

# Prints the path of module NAME (dashes and underscores are interchangeable).
_kernel_module_path() {
    local name=$1 alt
    alt=${name//_/-}
    find "$KERNEL_DIR/lib/modules/$KERNEL_RELEASE" \( -name "$name.ko" -o -name "$alt.ko" \
        -o -name "${name//-/_}.ko" \) -print -quit
}

# Prints the comma-separated `depends=` of a module file, read from its .modinfo section.
_kernel_module_depends() {
    local tmp
    tmp=$(mktemp)
    objcopy -O binary --only-section=.modinfo "$1" "$tmp" 2>/dev/null
    tr '\0' '\n' <"$tmp" | sed -n 's/^depends=//p'
    rm -f "$tmp"
}

kernel_modules() {
    declare -A seen=()
    local order=()
    _visit() {
        local name=$1 path dep
        [ -n "${seen[$name]:-}" ] && return 0
        seen[$name]=1
        path=$(_kernel_module_path "$name")
        if [ -z "$path" ]; then
            echo "kernel_modules: module $name not found in $KERNEL_RELEASE" >&2
            return 1
        fi
        for dep in $(_kernel_module_depends "$path" | tr ',' ' '); do
            _visit "$dep" || return 1
        done
        order+=("$path")
    }
    local m
    for m in "$@"; do _visit "$m" || return 1; done
    printf '%s\n' "${order[@]}"
}

initramfs_base() {
    local dir=$1
    mkdir -p "$dir"/{bin,sbin,proc,sys,dev,tmp,run,etc,lib/modules,usr/bin,usr/sbin}
    cp /bin/busybox "$dir/bin/busybox"
    local applet
    for applet in $("$dir/bin/busybox" --list); do
        [ -e "$dir/bin/$applet" ] || ln -s busybox "$dir/bin/$applet"
    done
}

# Copies a dynamically linked program and the libraries it needs into DIR.
initramfs_add_program() {
    local dir=$1 prog=$2 lib
    mkdir -p "$dir$(dirname "$prog")"
    cp -L "$prog" "$dir$prog"
    for lib in $(ldd "$prog" 2>/dev/null | grep -o '/[^ ]*'); do
        mkdir -p "$dir$(dirname "$lib")"
        cp -L "$lib" "$dir$lib"
    done
}

initramfs_pack() {
    local dir=$1 out=$2
    (cd "$dir" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$out"
}
