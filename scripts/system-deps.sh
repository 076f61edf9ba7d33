#!/usr/bin/env bash
# Install the Debian packages the test suite needs, when they are missing and we are allowed to.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/lib/podman/netavark ] || need+=(netavark)
# docker-compose.yml started for real (tests/container/test_compose.py): podman-compose drives podman,
# whose runtime here is runc (crun refuses hybrid cgroups) and whose bridge networks need iptables.
# Their configuration is the project's (tests/container/containers.conf), not the machine's.
command -v podman >/dev/null || need+=(podman)
command -v podman-compose >/dev/null || need+=(podman-compose)
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
command -v npm >/dev/null || need+=(npm)
command -v wrk >/dev/null || need+=(wrk)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the web page's browser test (Playwright drives it)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)  # readable text in its screenshot
# tcmalloc: `capsnet train` runs under it when present (capsnet/model_export/malloc.py; tests/model_export/test_malloc.py)
ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || need+=(libtcmalloc-minimal4)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: please install: ${need[*]} (Debian/Ubuntu package names); continuing without them" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
