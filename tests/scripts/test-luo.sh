#!/bin/bash
# systemd 262's `test-luo`, unmodified, against a luo daemon serving
# /dev/liveupdate (the path test-luo opens), across simulated updates:
#   store        → luo update → check, store → luo update → check
#   store-hijack → luo update → check-hijack
# and the kexec count PID 1 keeps in the mapping's state (1, then 2).
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

# Runs "$@" under luo run, shows its output and fails unless it says $1.
expect() {
  local want=$1 out
  shift
  out=$("$LUO" run -- "$@" 2>&1) || { echo "$out"; fail "$*"; }
  echo "$out"
  grep -qF -- "$want" <<<"$out" || fail "$* did not say '$want'"
}
update() {
  "$LUO" status --state-dir "$STATE"
  "$LUO" update --state-dir "$STATE" || fail "luo update"
}

# store, update, check; the check's service stores again (as it would run
# after a kexec), so a second update carries PID 1's kexec count on.
"$LUO" run -- "$LUO" fdstore hold -- "$T" store || fail "test-luo store"
update
expect "kexecs count 1" "$LUO" fdstore restore -- sh -c "'$T' check && '$LUO' fdstore hold -- '$T' store"
echo "TEST-LUO PASS: store, update, check"
update
expect "kexecs count 2" "$LUO" fdstore restore -- "$T" check
echo "TEST-LUO PASS: check, store, update, check (kexecs count 2)"
"$LUO" run -- "$LUO" fdstore hold --unit hijack.service -- "$T" store-hijack || fail "test-luo store-hijack"
update
expect "No LISTEN_FDS set" "$LUO" fdstore restore --unit hijack.service -- "$T" check-hijack
echo "TEST-LUO PASS: store-hijack, update, check-hijack"
