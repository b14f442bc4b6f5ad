#!/usr/bin/env bash
# Install everything, start the real components the tests use (dockerd, a
# single-node Ceph RADOS Gateway), and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh

if [ -x scripts/ceph-rgw-up.sh ]; then
  ./scripts/ceph-rgw-up.sh
fi

set +e
.venv/bin/pytest -rs -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
