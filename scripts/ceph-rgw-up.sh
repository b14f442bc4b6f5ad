#!/usr/bin/env bash
# Start a single-node Ceph cluster with the RADOS Gateway (S3) on 127.0.0.1 for tests and
# benchmarks: one monitor, one OSD (memstore by default), pools of size 1, radosgw with the
# beast frontend. Uses Debian's ceph-mon, ceph-osd, radosgw and ceph-common packages; runs as
# root, no systemd.
#
# Idempotent: when the gateway already answers, it only prints the environment; when the
# cluster runs but radosgw was stopped, it starts radosgw again; a broken leftover directory is
# torn down and rebuilt. Concurrent callers are serialised with flock.
#
# Settings (environment): LAYERFS_CEPH_DIR (/tmp/layerfs-ceph), LAYERFS_RGW_PORT (7480),
# LAYERFS_CEPH_STORE (memstore|bluestore), LAYERFS_CEPH_GB (4).
# Output: the S3 environment (AWS_ENDPOINT_URL, keys, ...) on stdout, also written to
# $LAYERFS_CEPH_DIR/s3.env for `source`.
set -euo pipefail

DIR=${LAYERFS_CEPH_DIR:-/tmp/layerfs-ceph}
PORT=${LAYERFS_RGW_PORT:-7480}
STORE=${LAYERFS_CEPH_STORE:-memstore}
GB=${LAYERFS_CEPH_GB:-4}
MON_PORT=${LAYERFS_CEPH_MON_PORT:-13310}
ACCESS_KEY=${LAYERFS_S3_ACCESS_KEY:-LAYERFSTESTKEY000001}
SECRET_KEY=${LAYERFS_S3_SECRET_KEY:-layerfs-test-secret-0000000000000000001}
WAIT=${LAYERFS_CEPH_WAIT:-90}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$DIR/ceph.conf
KEYRING=$DIR/keyring
ENDPOINT=http://127.0.0.1:$PORT

say() { echo "ceph-rgw-up: [${SECONDS}s] $*" >&2; }
die() { say "$*"; exit 1; }
ceph_cli() { ceph -c "$CONF" --connect-timeout 15 "$@"; }

# retry NAME LOG CMD...: run CMD until it succeeds; after $WAIT seconds show LOG and fail.
retry() {
  local name=$1 logfile=$2 deadline=$((SECONDS + WAIT))
  shift 2
  while ! "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "$name did not come up within ${WAIT}s; end of $logfile:"
      tail -n 25 "$logfile" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.2
  done
}

rgw_answers() {
  python3 - "$ENDPOINT" <<'PY'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/", timeout=2)
PY
}

pid_alive() {  # pid_alive NAME: the daemon NAME (e.g. mon.a) runs from our config
  local f=$DIR/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$CONF"
}

write_env() {
  cat >"$DIR/s3.env" <<ENV
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
ENV
}

write_conf() {
  local fsid=$1 bytes=$((GB << 30))
  cat >"$CONF" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
keyring = $KEYRING
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
log to stderr = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
osd objectstore = $STORE
memstore device bytes = $bytes
bluestore block size = $bytes
bluestore block create = true
osd memory target = 1073741824
osd op num shards = 2
osd op num threads per shard = 2
# a radosgw killed by a test leaves its watches behind; with the defaults every bucket
# create/delete then waits 30 s for the dead watcher
osd client watch timeout = 3
osd default notify timeout = 3

[mon]
mon data = $DIR/mon.\$id
mon cluster log file = $DIR/log/cluster.log
paxos propose interval = 0.05

[osd]
osd data = $DIR/osd.\$id

[client.rgw.s3]
rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw data = $DIR/rgw.s3
rgw dns name = localhost
rgw enable usage log = false
CONF
}

make_keys() {
  ceph-authtool --create-keyring "$KEYRING" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$KEYRING" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' >/dev/null
  ceph-authtool "$KEYRING" --gen-key -n osd.0 --cap mon 'allow profile osd' \
    --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
  ceph-authtool "$KEYRING" --gen-key -n client.rgw.s3 --cap mon 'allow rw' \
    --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
  chmod 600 "$KEYRING"
}

start_mon() {
  monmaptool --create --fsid "$1" --addv a "v2:127.0.0.1:$MON_PORT" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$KEYRING"
  ceph-mon -c "$CONF" -i a 9>&-
  retry "the monitor" "$DIR/log/mon.a.log" ceph_cli mon stat
  ceph_cli config set mon auth_allow_insecure_global_id_reclaim false >/dev/null
}

start_osd() {
  local uuid id
  uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(ceph_cli osd new "$uuid")
  [ "$id" = 0 ] || die "the new OSD got id $id, expected 0"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" 2>"$DIR/log/osd-mkfs.log" ||
    die "OSD mkfs failed: $(tail -n 5 "$DIR/log/osd-mkfs.log")"
  ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd.0.err" 9>&-
  retry "the OSD" "$DIR/log/osd.0.log" sh -c "ceph -c '$CONF' osd stat | grep -q '1 up'"
}

# radosgw creates its pools one at a time when it starts and on first use; creating them
# beforehand, in parallel, is much faster.
# One ceph process reads all the commands from stdin: starting the ceph tool costs more
# than the commands themselves.
make_pools() {
  local pool
  for pool in .rgw.root default.rgw.control default.rgw.meta default.rgw.log \
    default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
    echo "osd pool create $pool 8 8"
    echo "osd pool application enable $pool rgw"
  done | ceph_cli >"$DIR/log/pools.log" 2>&1 || die "creating the RGW pools failed: see $DIR/log/pools.log"
  [ "$(ceph_cli osd pool ls | wc -l)" -ge 7 ] || die "the RGW pools are missing: see $DIR/log/pools.log"
}

start_rgw() {
  radosgw -c "$CONF" -n client.rgw.s3 9>&-
  retry "radosgw" "$DIR/log/client.rgw.s3.log" rgw_answers
}

make_user() {
  radosgw-admin -c "$CONF" user create --uid=layerfs-test --display-name="layerfs tests" \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
}

bring_up() {
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$DIR"/{run,log,mon.a,osd.0,rgw.s3}
  write_conf "$fsid"
  make_keys
  start_mon "$fsid"
  start_osd
  say "osd up"; make_pools; say "pools made"
  start_rgw
  make_user
  write_env
}

for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install ceph-mon ceph-osd radosgw ceph-common"
done

mkdir -p "$(dirname "$DIR")"
# the daemons are started with fd 9 closed so they do not keep holding the lock
exec 9>"$DIR.lock"
flock 9

if [ -f "$DIR/s3.env" ] && rgw_answers 2>/dev/null; then
  :  # already up
elif [ -f "$DIR/s3.env" ] && pid_alive mon.a && pid_alive osd.0 && ! pid_alive client.rgw.s3; then
  say "cluster runs without radosgw: starting radosgw"
  start_rgw
else
  if [ -e "$DIR" ]; then
    say "removing the incomplete cluster in $DIR"
    LAYERFS_CEPH_DIR=$DIR LAYERFS_CEPH_LOCKED=1 "$HERE/ceph-rgw-down.sh" >/dev/null
  fi
  bring_up
  say "up in ${SECONDS}s"
fi
cat "$DIR/s3.env"
