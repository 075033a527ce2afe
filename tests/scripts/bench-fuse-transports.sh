#!/bin/bash
# Per-ioctl latency over both FUSE transports in one run: a daemon reading
# /dev/fuse and one taking FUSE over io_uring serve side by side, and
# `luo bench` alternates between them for ROUNDS rounds (default 2).
#
#   sudo unshare -m --propagation private tests/scripts/bench-fuse-transports.sh
#
# Both daemons (and their keepers and session-file openers) run on CPU 0, and
# the bench runs on each CPU of CPUS (default "0 1"): on the daemon's CPU and
# on another one. On these machines where the caller runs against where the
# daemon runs moves every row far more than anything else, so each placement
# gets its own rows.
#
# The io_uring daemon is started while fuse.enable_uring=1 (the kernel reads
# the parameter at mount time); the parameter is put back right after, so the
# script leaves the machine as it found it. Needs a kernel with
# CONFIG_FUSE_IO_URING (6.14+), taskset and a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
luo=$PWD/target/release/luo
param=/sys/module/fuse/parameters/enable_uring
[ -w "$param" ] || { echo "$param is missing: this kernel has no FUSE over io_uring" >&2; exit 1; }
was=$(cat "$param")
trap 'echo "$was" > "$param"; for t in dev-fuse io-uring; do "$luo" shutdown --state-dir /tmp/luo-bench-$t/state >/dev/null 2>&1 || true; done' EXIT
for t in dev-fuse io-uring; do
  d=/tmp/luo-bench-$t
  rm -rf "$d"; mkdir -p "$d"
  [ "$t" = io-uring ] && echo 1 > "$param"
  taskset -c 0 "$luo" daemon --fuse-transport "$t" --device "$d/dev" --state-dir "$d/state" 2> "$d/log" &
  until "$luo" status --state-dir "$d/state" >/dev/null 2>&1; do sleep 0.05; done
  echo "$was" > "$param"
  "$luo" status --state-dir "$d/state" | head -1
done
for round in $(seq "${ROUNDS:-2}"); do
  for cpu in ${CPUS:-0 1}; do
    for t in dev-fuse io-uring; do
      echo "=== round $round: caller on CPU $cpu, daemon on CPU 0: $t"
      taskset -c "$cpu" "$luo" bench --device "/tmp/luo-bench-$t/dev" --calls "${CALLS:-2000}" \
        --sessions 200 --files 200 --sizes-kib 4
    done
  done
done
