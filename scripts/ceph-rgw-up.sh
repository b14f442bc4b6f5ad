#!/usr/bin/env bash
# Start a single-node Ceph cluster with the RADOS Gateway (S3) on 127.0.0.1 for tests and
# benchmarks: one monitor, one OSD (memstore by default), pools of size 1, radosgw with the
# beast frontend. Uses Debian's ceph-mon, ceph-osd, radosgw and ceph-common packages; runs as
# root, no systemd.
#
# Idempotent: when this cluster's own gateway is up, it only prints the environment; when the
# cluster runs but radosgw was stopped, it starts radosgw again; a broken leftover directory is
# torn down and rebuilt. Concurrent callers are serialised with flock.
# "Our gateway is up" means: the radosgw of $LAYERFS_CEPH_DIR/run/client.rgw.s3.pid runs from
# our ceph.conf, that process listens on the port recorded in ceph.conf, and a signed
# ListBuckets with the test user's keys returns 200. Another server answering on the port (a
# second cluster's radosgw, minio, ...) is not ours.
#
# Port: radosgw listens on LAYERFS_RGW_PORT when it is set (and fails if another server holds
# it); otherwise on the port recorded in ceph.conf by an earlier run, or 7480 for a new
# cluster; when that port is held by another server it takes the first free one of 7481-7580
# (and says so). Tests that pick their own ports take them from the ephemeral range, so the
# two do not meet.
#
# Settings (environment): LAYERFS_CEPH_DIR (/tmp/layerfs-ceph), LAYERFS_RGW_PORT (see above),
# LAYERFS_CEPH_STORE (memstore|bluestore), LAYERFS_CEPH_GB (4).
# Output: the S3 environment (AWS_ENDPOINT_URL, keys, ...) on stdout, also written to
# $LAYERFS_CEPH_DIR/s3.env for `source`.
set -euo pipefail

DIR=${LAYERFS_CEPH_DIR:-/tmp/layerfs-ceph}
PORT_SET=${LAYERFS_RGW_PORT:+1}
DEFAULT_PORT=7480
SPARE_PORTS="7481 7580"  # first and last port tried when the wanted one is taken
STORE=${LAYERFS_CEPH_STORE:-memstore}
GB=${LAYERFS_CEPH_GB:-4}
MON_PORT=${LAYERFS_CEPH_MON_PORT:-13310}
ACCESS_KEY=${LAYERFS_S3_ACCESS_KEY:-LAYERFSTESTKEY000001}
SECRET_KEY=${LAYERFS_S3_SECRET_KEY:-layerfs-test-secret-0000000000000000001}
WAIT=${LAYERFS_CEPH_WAIT:-90}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$DIR/ceph.conf
KEYRING=$DIR/keyring
RGW_PID=$DIR/run/client.rgw.s3.pid
PORT=  # radosgw's port: set by choose_port or rgw_is_ours

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

# net free PORT: nothing listens on 127.0.0.1:PORT (a bind with SO_REUSEADDR works)
# net pick FIRST LAST: print the first free port of FIRST..LAST
# net listens PID PORT: process PID holds a listening TCP socket on PORT
# net auth PORT ACCESS SECRET: a SigV4-signed ListBuckets on 127.0.0.1:PORT returns 200
# (standard library only: the system python3 may lack botocore)
net() {
  python3 - "$@" <<'PY'
import datetime, hashlib, hmac, os, socket, sys, urllib.error, urllib.request

def free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

def listens(pid, port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False

def auth(port, access, secret, region="us-east-1"):
    host = f"127.0.0.1:{port}"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now[:8]}/{region}/s3/aws4_request"
    body = hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = f"GET\n/\n\nhost:{host}\nx-amz-content-sha256:{body}\nx-amz-date:{now}\n\n{signed}\n{body}"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = f"AWS4-HMAC-SHA256\n{now}\n{scope}\n{digest}"
    key = ("AWS4" + secret).encode()
    for part in (now[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    cred = f"Credential={access}/{scope}, SignedHeaders={signed}, Signature={sig}"
    req = urllib.request.Request(f"http://{host}/", headers={
        "x-amz-date": now, "x-amz-content-sha256": body,
        "Authorization": f"AWS4-HMAC-SHA256 {cred}",
    })
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200 and b"ListAllMyBucketsResult" in resp.read()
    except OSError:  # HTTPError (403 InvalidAccessKeyId, ...) is an OSError too
        return False

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "free":
    sys.exit(0 if free(int(args[0])) else 1)
if cmd == "pick":
    for port in range(int(args[0]), int(args[1]) + 1):
        if free(port):
            print(port)
            sys.exit(0)
    sys.exit(1)
if cmd == "listens":
    sys.exit(0 if listens(int(args[0]), int(args[1])) else 1)
if cmd == "auth":
    sys.exit(0 if auth(int(args[0]), args[1], args[2]) else 1)
sys.exit(f"net: unknown command {cmd}")
PY
}

pid_alive() {  # pid_alive NAME: the daemon NAME (e.g. mon.a) runs from our config
  local f=$DIR/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$CONF"
}

# recorded_port: print the port in ceph.conf's rgw frontends line (empty when there is none)
recorded_port() {
  sed -n 's/^rgw frontends = .*endpoint=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$CONF" 2>/dev/null
}

refuse_port() {
  die "127.0.0.1:$1 (LAYERFS_RGW_PORT) is held by another server, not by the radosgw of $DIR: stop that server, or unset LAYERFS_RGW_PORT to let this script pick a free port"
}

# choose_port WANTED: set PORT to WANTED if it is free, else (unless LAYERFS_RGW_PORT asked
# for it) to a free spare port; record it in ceph.conf.
choose_port() {
  local wanted=$1
  if net free "$wanted"; then
    PORT=$wanted
  elif [ -n "$PORT_SET" ]; then
    refuse_port "$wanted"
  else
    # shellcheck disable=SC2086
    PORT=$(net pick $SPARE_PORTS) ||
      die "127.0.0.1:$wanted is held by another server and no port of ${SPARE_PORTS/ /-} is free"
    say "127.0.0.1:$wanted is held by another server (not the radosgw of $DIR): radosgw uses port $PORT"
  fi
  sed -i "s/^rgw frontends = .*/rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1/" "$CONF"
}

# rgw_is_ours: our radosgw runs, listens on the recorded port, and takes our test user's keys
rgw_is_ours() {
  local pid
  PORT=$(recorded_port)
  [ -n "$PORT" ] && pid_alive client.rgw.s3 || return 1
  pid=$(cat "$RGW_PID")
  net listens "$pid" "$PORT" && net auth "$PORT" "$ACCESS_KEY" "$SECRET_KEY"
}

write_env() {
  cat >"$DIR/s3.env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
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
rgw frontends = beast endpoint=127.0.0.1:$DEFAULT_PORT tcp_nodelay=1
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

# start_rgw WANTED: start radosgw on port WANTED, or on a spare port when another server holds
# WANTED (see choose_port); wait until it listens. A port taken between the choice and the
# start makes radosgw exit: then another port is chosen.
start_rgw() {
  local wanted=$1 attempt pid deadline log=$DIR/log/client.rgw.s3.log
  for attempt in 1 2 3; do
    choose_port "$wanted"
    rm -f "$RGW_PID"
    radosgw -c "$CONF" -n client.rgw.s3 9>&-
    deadline=$((SECONDS + WAIT))
    while :; do
      if pid_alive client.rgw.s3; then
        pid=$(cat "$RGW_PID")
        net listens "$pid" "$PORT" && return 0
      elif ! pgrep -f -- "^radosgw -c $CONF -n client.rgw.s3" >/dev/null; then
        break  # radosgw exited
      fi  # else: started, pid file not written yet
      if ((SECONDS >= deadline)); then
        say "radosgw did not listen on port $PORT within ${WAIT}s; end of $log:"
        tail -n 25 "$log" >&2 2>/dev/null || true
        exit 1
      fi
      sleep 0.2
    done
    if net free "$PORT"; then
      say "radosgw exited (attempt $attempt); end of $log:"
      tail -n 25 "$log" >&2 2>/dev/null || true
      exit 1
    fi
    say "port $PORT was taken while radosgw started"
  done
  die "radosgw could not get a port in 3 attempts; see $log"
}

make_user() {
  radosgw-admin -c "$CONF" user create --uid=layerfs-test --display-name="layerfs tests" \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
}

bring_up() {
  local fsid
  if [ -n "$PORT_SET" ] && ! net free "$LAYERFS_RGW_PORT"; then
    refuse_port "$LAYERFS_RGW_PORT"  # before building a cluster for nothing
  fi
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$DIR"/{run,log,mon.a,osd.0,rgw.s3}
  write_conf "$fsid"
  make_keys
  start_mon "$fsid"
  start_osd
  say "osd up"; make_pools; say "pools made"
  start_rgw "${LAYERFS_RGW_PORT:-$DEFAULT_PORT}"
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

if [ -f "$DIR/s3.env" ] && rgw_is_ours && [ "${LAYERFS_RGW_PORT:-$PORT}" = "$PORT" ]; then
  :  # already up
elif [ -f "$DIR/s3.env" ] && pid_alive mon.a && pid_alive osd.0 && [ -n "$(recorded_port)" ]; then
  if [ -n "$PORT_SET" ] && [ "$LAYERFS_RGW_PORT" != "$(recorded_port)" ] && ! net free "$LAYERFS_RGW_PORT"; then
    refuse_port "$LAYERFS_RGW_PORT"  # before stopping the running radosgw
  fi
  if pid_alive client.rgw.s3 && [ "${LAYERFS_RGW_PORT:-$(recorded_port)}" != "$(recorded_port)" ]; then
    say "radosgw listens on port $(recorded_port), LAYERFS_RGW_PORT asks for $LAYERFS_RGW_PORT: restarting it"
  elif pid_alive client.rgw.s3; then
    say "radosgw runs but is not usable on port $(recorded_port) (does not listen there, or the test user's keys fail): restarting it"
  else
    say "cluster runs without radosgw: starting radosgw"
  fi
  if pid_alive client.rgw.s3; then
    kill -KILL "$(cat "$RGW_PID")"
    for _ in $(seq 50); do pid_alive client.rgw.s3 || break; sleep 0.1; done
  fi
  start_rgw "${LAYERFS_RGW_PORT:-$(recorded_port)}"
  retry "the test user" "$DIR/log/client.rgw.s3.log" net auth "$PORT" "$ACCESS_KEY" "$SECRET_KEY"
  write_env
else
  if [ -e "$DIR" ]; then
    say "removing the incomplete cluster in $DIR"
    LAYERFS_CEPH_DIR=$DIR LAYERFS_CEPH_LOCKED=1 "$HERE/ceph-rgw-down.sh" >/dev/null
  fi
  bring_up
  say "up in ${SECONDS}s"
fi
cat "$DIR/s3.env"
