#!/usr/bin/env bash
# The main job on the embedded default store (a local directory): build a small
# image with the Docker daemon, import it into layerfs, mount it read-only, show
# its tree, run a real container (runc, the runtime under Docker and containerd)
# on a writable mount of it, show what the container changed, unmount.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh

export PATH="$here/.venv/bin:$PATH"
work=$(mktemp -d /tmp/layerfs-demo.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt"
bundle="$work/bundle"
cleanup() {
  runc delete -f "layerfs-demo-$$" >/dev/null 2>&1 || true
  mountpoint -q "$mnt" && layerfs umount "$mnt" || true
  mountpoint -q "$bundle/rootfs" && layerfs umount "$bundle/rootfs" || true
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
echo "== layerfs umount $mnt"
layerfs umount "$mnt"

echo "== a container on layerfs: layerfs mount layerfs-demo:latest $bundle/rootfs --upper $work/changes"
mkdir -p "$bundle/rootfs"
layerfs mount layerfs-demo:latest "$bundle/rootfs" --upper "$work/changes"
(cd "$bundle" && runc spec)
python - "$bundle/config.json" <<'PY'
import json, sys
path = sys.argv[1]
spec = json.load(open(path))
spec["process"]["terminal"] = False
spec["process"]["args"] = [
    "/bin/sh", "-c",
    "echo \"in the container: $(cat /srv/app/hello.txt), pid $$, $(ls /bin | wc -l) programs\"; "
    "echo written-in-the-container > /srv/app/new.txt; rm /srv/app/link",
]
spec["root"]["readonly"] = False
spec["hostname"] = "layerfs-demo"
json.dump(spec, open(path, "w"), indent=2)
PY
echo "== runc run (namespaces, cgroup, the image's own /bin/sh)"
(cd "$bundle" && runc run "layerfs-demo-$$")
echo "== what the container changed, kept in $work/changes/upper (a kernel overlayfs upper)"
(cd "$work/changes/upper" && find . -mindepth 1 -exec ls -ld {} +)
echo "== layerfs umount $bundle/rootfs"
layerfs umount "$bundle/rootfs"
echo "demo: done"
