#!/bin/bash
# systemd 262's `test-luo`, unmodified, against a luo daemon serving
# /dev/liveupdate (the path test-luo opens), across simulated updates:
#   store        → luo update → check
#   store-hijack → luo update → check-hijack
# `luo fdstore` plays PID 1's fd store and systemd-shutdown's preserve step.
# Usage: test-luo.sh LUO SYSTEMD_ROOT WORKDIR   (run as root, in a private
# mount namespace: `unshare -m --propagation private`)
set -euo pipefail
LUO=$1 ROOT=$2 WORK=$3
mkdir -p "$WORK"
LIB=$ROOT/usr/lib/x86_64-linux-gnu
# test-luo as shipped, through sid's loader and libraries.
cat > "$WORK/test-luo" <<WRAP
#!/bin/sh
exec "$ROOT/usr/lib64/ld-linux-x86-64.so.2" --library-path "$LIB:$LIB/systemd" \
  "$ROOT/usr/lib/systemd/tests/unit-tests/manual/test-luo" "\$@"
WRAP
chmod +x "$WORK/test-luo"
T=$WORK/test-luo
STATE=$WORK/state
fail() { echo "TEST-LUO FAIL: $*"; cat "$WORK/daemon.log" 2>/dev/null | tail -20; exit 1; }

"$LUO" daemon --device /dev/liveupdate --state-dir "$STATE" 2>"$WORK/daemon.log" &
for _ in $(seq 200); do "$LUO" status --state-dir "$STATE" >/dev/null 2>&1 && break; sleep 0.05; done
trap '"$LUO" shutdown --state-dir "$STATE" >/dev/null 2>&1 || true' EXIT

pair() {
  local store=$1 check=$2
  "$LUO" run -- "$LUO" fdstore hold -- "$T" "$store" || fail "test-luo $store"
  "$LUO" status --state-dir "$STATE"
  "$LUO" update --state-dir "$STATE" || fail "luo update after $store"
  "$LUO" run -- "$LUO" fdstore restore -- "$T" "$check" || fail "test-luo $check"
  echo "TEST-LUO PASS: $store, update, $check"
}
pair store check
pair store-hijack check-hijack
