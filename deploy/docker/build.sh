#!/usr/bin/env bash
# Builds the image `muster:local` (override with MUSTER_IMAGE) from a muster binary of this
# checkout (MUSTER_BIN, default target/release/muster, built if missing), the shared
# libraries it links, and Debian's busybox-static. Nothing is pulled from a registry.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
image="${MUSTER_IMAGE:-muster:local}"
bin="${MUSTER_BIN:-$repo/target/release/muster}"
if [ ! -x "$bin" ]; then
  (cd "$repo" && cargo build --release -p muster)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
# Debug information is of no use in the image (and is most of a debug build's size).
strip --strip-debug -o "$root/usr/local/bin/muster" "$bin"
# The loader and every library the binary links, at the paths it names them by.
ldd "$bin" | awk '/=>/ { print $3 } !/=>/ && /^[ \t]*\// { print $1 }' | while read -r lib; do
  [ -e "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
if ! command -v busybox >/dev/null 2>&1 || ! file "$(command -v busybox)" 2>/dev/null | grep -q static; then
  (cd "$work" && { apt-get download busybox-static >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download busybox-static >/dev/null; }; } \
    && dpkg-deb -x busybox-static_*.deb bb && cp bb/bin/busybox "$root/bin/busybox")
else
  cp "$(command -v busybox)" "$root/bin/busybox"
fi
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
cp "$here/Dockerfile" "$work/Dockerfile"
docker build -q -t "$image" "$work" >/dev/null
echo "built $image from $bin"
