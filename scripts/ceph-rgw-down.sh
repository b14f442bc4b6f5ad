#!/usr/bin/env bash
# Stop the cluster that ceph-rgw-up.sh started and delete its directory. Daemons are found by
# their pid files and signalled only if their command line names our config file.
# Settings: LAYERFS_CEPH_DIR (/tmp/layerfs-ceph); LAYERFS_CEPH_KEEP=1 keeps the directory;
# LAYERFS_CEPH_GENTLE=1 sends SIGTERM and waits (about 10 s) instead of SIGKILL (the data is
# thrown away anyway).
set -uo pipefail

DIR=${LAYERFS_CEPH_DIR:-/tmp/layerfs-ceph}
CONF=$DIR/ceph.conf

if [ "${LAYERFS_CEPH_LOCKED:-0}" != 1 ]; then
  exec 9>"$DIR.lock"
  flock 9
fi
if [ ! -d "$DIR" ]; then
  echo "ceph-rgw-down: nothing runs from $DIR"
  exit 0
fi

running() {  # running PID: the process exists and is not a zombie
  [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

for name in client.rgw.s3 osd.0 mon.a; do
  pidfile=$DIR/run/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  running "$pid" || continue
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$CONF" || continue
  if [ "${LAYERFS_CEPH_GENTLE:-0}" = 1 ]; then
    kill -TERM "$pid"
    for _ in $(seq 150); do running "$pid" || break; sleep 0.1; done
  fi
  running "$pid" && kill -KILL "$pid"
  for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
  echo "ceph-rgw-down: stopped $name ($pid)"
done
[ "${LAYERFS_CEPH_KEEP:-0}" = 1 ] || rm -rf "$DIR"
echo "ceph-rgw-down: down"
