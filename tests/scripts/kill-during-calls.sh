#!/bin/bash
# How often a call fails when the daemon is SIGKILLed under a busy client, per
# FUSE transport: TRIALS runs (default 20) of a client making 150
# SESSION_PRESERVE_FDs one after another (the restart suite's
# probe_churn_preserve, under `luo run`) while the daemon is killed once,
# 5-54 ms in, and started again. Over /dev/fuse the next daemon answers every
# call; over io_uring a call on its way to the killed daemon fails with
# ECANCELED (fs/fuse/dev_uring.c).
#
#   cargo build --release && cargo test --test restart --no-run
#   sudo unshare -m --propagation private tests/scripts/kill-during-calls.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
luo=$PWD/target/release/luo
probe=$(ls -t target/debug/deps/restart-* | grep -v '\.d$' | head -1)
param=/sys/module/fuse/parameters/enable_uring
[ -w "$param" ] || { echo "$param is missing: this kernel has no FUSE over io_uring" >&2; exit 1; }
was=$(cat "$param")
trap 'echo "$was" > "$param"' EXIT
for t in dev-fuse io-uring; do
  failed=0 canceled=0
  for i in $(seq "${TRIALS:-20}"); do
    d=/tmp/luo-kill-$t-$i
    rm -rf "$d"; mkdir -p "$d"
    start() {
      "$luo" daemon --fuse-transport "$t" --device "$d/dev" --state-dir "$d/state" 2>> "$d/log" &
      pid=$!
      until "$luo" status --state-dir "$d/state" >/dev/null 2>&1; do sleep 0.02; done
    }
    echo 1 > "$param"; start; echo "$was" > "$param"
    LUO_PROBE_DEVICE=$d/dev "$luo" run --device "$d/dev" -- "$probe" probe_churn_preserve \
      --exact --ignored --nocapture --test-threads=1 > "$d/probe.out" 2>&1 &
    client=$!
    sleep "0.0$((RANDOM % 50 + 5))"
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    start
    if ! wait "$client"; then
      failed=$((failed + 1))
      if grep -q "Operation canceled" "$d/probe.out"; then canceled=$((canceled + 1)); fi
    fi
    "$luo" shutdown --state-dir "$d/state" >/dev/null
  done
  echo "$t: a call failed in $failed of ${TRIALS:-20} runs ($canceled with ECANCELED)"
done
