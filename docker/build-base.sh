#!/usr/bin/env bash
# Build the local stand-in for the CUDA base image: Debian (debootstrap minbase) with python3 and
# python3-venv, committed as a buildah image. Machines without a registry build and test the image
# from docker/Dockerfile on top of it (BASE_IMAGE=localhost/capsnet-base).
#
# Idempotent: an image already built from this same recipe is kept (the recipe's hash is stored as a
# label), so repeated runs cost nothing. Needs root, buildah and debootstrap.
#
#   docker/build-base.sh            build unless an up-to-date image exists
#   docker/build-base.sh --force    rebuild
#   CAPSNET_BASE_IMAGE=localhost/other DEBIAN_SUITE=trixie docker/build-base.sh
set -euo pipefail

image=${CAPSNET_BASE_IMAGE:-localhost/capsnet-base}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv

for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-base: $tool is not installed" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "build-base: must run as root (debootstrap, buildah mount)" >&2; exit 1; }

recipe=$(cat "${BASH_SOURCE[0]}" <(echo "$suite $mirror $packages") | sha256sum | cut -c1-16)
if [[ ${1:-} != --force ]]; then
    current=$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "capsnet.base.recipe"}}' \
        "$image" 2>/dev/null || true)
    if [[ $current == "$recipe" ]]; then
        echo "build-base: $image is up to date (recipe $recipe)"
        exit 0
    fi
fi

start=$SECONDS
rootfs=$(mktemp -d /var/tmp/capsnet-base.XXXXXX)
ctr=
cleanup() {
    [[ -n $ctr ]] && buildah rm "$ctr" >/dev/null 2>&1
    rm -rf "$rootfs"
}
trap cleanup EXIT

echo "build-base: debootstrap $suite into $rootfs"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 1
}
rm -f "$rootfs.log"

# What an image needs and a chroot leaves behind: package caches, docs, man pages, locales.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/root/.cache
find "$rootfs"/dev -mindepth 1 -delete  # the runtime provides /dev

ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
buildah umount "$ctr" >/dev/null
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /bin/bash \
    --label "capsnet.base.recipe=$recipe" \
    --label "org.opencontainers.image.description=Debian $suite minbase with $packages (local base for CapsNet)" \
    "$ctr"
buildah commit --quiet --rm "$ctr" "$image" >/dev/null
ctr=
echo "build-base: built $image (recipe $recipe) in $((SECONDS - start)) s"
