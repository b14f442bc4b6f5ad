#!/usr/bin/env bash
# Install everything layerfs and volplugin need on Debian 12 (as root), create the
# virtualenv in .venv, and start dockerd if none runs. Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make
  fuse3 libfuse3-dev pkg-config fuse-overlayfs attr
  docker.io docker-compose skopeo busybox-static debootstrap containerd
  docker-registry  # the tests start their own (tests/support/registry.py), never its :5000 service
  ceph-mon ceph-osd radosgw ceph-common
  restic fio hyperfine zstd pigz curl
  autoconf automake perl
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and starts dockerd)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: installing the Python packages failed (above)" >&2
  exit 1
fi
rm -f "$log"
# The project's modules compiled to bytecode, as an installed package has them:
# where PYTHONDONTWRITEBYTECODE is set, each process of an editable install
# would otherwise compile every module it imports, at every start.
.venv/bin/python -m compileall -q layerfs volplugin >/dev/null

modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd (log: /var/log/dockerd.log)"
  setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/dockerd.log" >&2; exit 1; }
fi
echo "setup: ready (virtualenv: $here/.venv)"
