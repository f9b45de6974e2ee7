#!/usr/bin/env bash
# Builds the images Muster's tests run jobs in, from Debian's busybox-static package.
# Idempotent: does nothing when the image already exists.
set -euo pipefail
IMAGE="${MUSTER_TEST_IMAGE:-muster-test/busybox:1}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "image $IMAGE already built"
  exit 0
fi
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download busybox-static >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get download busybox-static >/dev/null
fi
dpkg-deb -x busybox-static_*.deb root
cp "$here/busybox/Dockerfile" .
cp root/bin/busybox busybox
docker build -q -t "$IMAGE" . >/dev/null
echo "built $IMAGE"
