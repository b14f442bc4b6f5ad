#!/usr/bin/env bash
# The main job on the embedded default store (a local directory): build a small
# image with the Docker daemon, import it into layerfs, mount it read-only, show
# its tree, unmount.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh

export PATH="$here/.venv/bin:$PATH"
work=$(mktemp -d /tmp/layerfs-demo.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() {
  mountpoint -q "$mnt" && layerfs umount "$mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT

python - <<'PY'
from tests.support import dockerenv
dockerenv.ensure_busybox_image(dockerenv.ensure_dockerd())
PY
mkdir -p "$work/ctx"
cat > "$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM layerfs-test/busybox:base
RUN mkdir -p /srv/app && echo "hello from layerfs" > /srv/app/hello.txt && ln -s hello.txt /srv/app/link
RUN rm /etc/group && ln /srv/app/hello.txt /srv/app/hardlink
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t layerfs-demo:latest "$work/ctx" >/dev/null

echo "== layerfs import --from-docker layerfs-demo:latest"
layerfs import --from-docker layerfs-demo:latest
echo "== layerfs images"
layerfs images
echo "== layerfs mount layerfs-demo:latest $mnt"
layerfs mount layerfs-demo:latest "$mnt"
grep " $mnt " /proc/mounts
echo "== tree of /srv in the mount"
find "$mnt/srv" -exec ls -ldi {} +
echo "== cat $mnt/srv/app/hello.txt"
cat "$mnt/srv/app/hello.txt"
echo "== chroot $mnt /bin/sh -c 'ls /bin | wc -l'"
chroot "$mnt" /bin/sh -c 'ls /bin | wc -l'
echo "== layerfs umount $mnt"
layerfs umount "$mnt"
echo "demo: done"
