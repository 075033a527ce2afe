#!/bin/bash
# Runs the kernel's LUO selftests, unmodified, against `luo daemon`.
#
# Usage: run-selftest.sh LUO_BINARY SELFTEST_DIR single [RUNS]
#        run-selftest.sh LUO_BINARY SELFTEST_DIR two-stage TEST [SIGNAL [NEW_LUO]]
#
# `single` runs `liveupdate` RUNS times; `two-stage` runs TEST's stage 1 under
# `luo run`, a simulated update (`luo update --simulate`, in place of
# do_kexec.sh), and stage 2 under `luo run`. With SIGNAL, the daemon is
# killed with it after stage 1 and started again (from NEW_LUO if given, an
# upgrade) before the update.
#
# Everything happens in a private mount namespace whose /dev is a fresh tmpfs
# holding only the nodes the test needs, so a real /dev/liveupdate (or the
# host's /dev) is never touched.
set -euo pipefail
LUO=$(realpath "$1"); BIN=$(realpath "$2"); MODE=$3
if [ -z "${LUO_IN_NS:-}" ]; then
  exec env LUO_IN_NS=1 unshare --mount --propagation private "$0" "$@"
fi
WORK=$(mktemp -d /tmp/luo-selftest.XXXXXX)
mount -t tmpfs -o mode=755 luo-dev "$WORK"
for n in null zero full random urandom tty fuse; do
  touch "$WORK/$n" && mount --bind "/dev/$n" "$WORK/$n"
done
mkdir -p "$WORK/shm" "$WORK/pts" && mount --bind /dev/shm "$WORK/shm"
mount --move "$WORK" /dev 2>/dev/null || mount --bind "$WORK" /dev
STATE=$(mktemp -d /tmp/luo-state.XXXXXX)
"$LUO" daemon --device /dev/liveupdate --state-dir "$STATE" 2> "$STATE.log" &
DAEMON=$!
trap '"$LUO" shutdown --state-dir "$STATE" || kill $DAEMON; wait $DAEMON 2>/dev/null; cat "$STATE.log" >&2; rm -rf "$STATE" "$STATE.log"; rmdir "$WORK" 2>/dev/null' EXIT
for _ in $(seq 100); do "$LUO" status --state-dir "$STATE" >/dev/null 2>&1 && break; sleep 0.05; done
"$LUO" status --state-dir "$STATE" >/dev/null
cd "$BIN"
if [ "$MODE" = two-stage ]; then
  TEST=$4
  "$LUO" run --device /dev/liveupdate -- "./$TEST" --stage 1 || { echo "$TEST stage 1 FAILED"; exit 1; }
  if [ -n "${5:-}" ]; then
    kill -"$5" $DAEMON; wait $DAEMON || true
    LUO=$(realpath "${6:-$LUO}")
    "$LUO" daemon --device /dev/liveupdate --state-dir "$STATE" 2>> "$STATE.log" &
    DAEMON=$!
    for _ in $(seq 100); do "$LUO" status --state-dir "$STATE" >/dev/null 2>&1 && break; sleep 0.05; done
    "$LUO" status --state-dir "$STATE"
    echo "daemon restarted after SIG$5"
  fi
  "$LUO" update --simulate --state-dir "$STATE" || { echo "$TEST update FAILED"; exit 1; }
  "$LUO" run --device /dev/liveupdate -- "./$TEST" --stage 2 || { echo "$TEST stage 2 FAILED"; exit 1; }
  echo "$TEST: stage 1, simulated update, stage 2 passed"
  exit 0
fi
RUNS=${4:-1}
pass=0
for i in $(seq "$RUNS"); do
  out=$("$LUO" run --device /dev/liveupdate -- ./liveupdate 2>&1) || { echo "$out"; echo "run $i of $RUNS FAILED"; exit 1; }
  echo "$out" | grep -q '^# Totals: pass:15 fail:0 xfail:0 xpass:0 skip:0 error:0' || { echo "$out"; echo "run $i: not 15/15"; exit 1; }
  pass=$((pass + 1))
  [ "$i" = 1 ] && echo "$out"
done
echo "liveupdate selftest: $pass of $RUNS runs passed 15/15"
