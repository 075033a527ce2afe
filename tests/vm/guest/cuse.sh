# The userspace device as a real character device through /dev/cuse; the
# two-stage selftests through a daemon SIGKILL (the keeper holds the CUSE
# device) and `luo update --simulate`.
. /rig/lib.sh
[ ! -e /dev/liveupdate ] || fail "/dev/liveupdate exists before the daemon (liveupdate=off?)"
luo daemon --cuse --device /dev/liveupdate --state-dir /run/luo 2>/tmp/luo.log &
echo $! > /run/luo.pid
for _ in $(seq 200); do luo status --state-dir /run/luo >/dev/null 2>&1 && break; sleep 0.05; done
luo status --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the daemon did not start"; }
[ -c /dev/liveupdate ] || { ls -l /dev/liveupdate; cat /tmp/luo.log; fail "/dev/liveupdate is not a character device"; }
say "$(ls -l /dev/liveupdate)"
# rig.repeat=N runs the liveupdate selftest N times in a row (each must be
# 15/15), with the time each run took.
runs=$(arg rig.repeat 1)
for i in $(seq "$runs"); do
  t0=$(centis)
  liveupdate_15_of_15 luo run --
  say "liveupdate run $i of $runs: $(( ($(centis) - t0) * 10 )) ms"
done
# The selftest's heaviest case alone (2000 CREATE_SESSION and 2000 closes),
# against the harness's 30 s per case.
t0=$(centis)
out=$(cd $ST && luo run -- ./liveupdate -t preserve_many_sessions 2>&1) || { echo "$out"; fail "preserve_many_sessions failed"; }
say "preserve_many_sessions alone: $(( ($(centis) - t0) * 10 )) ms of the harness's 30000"
two_stage 1 luo run --
# The daemon killed and started again: the keeper holds the CUSE device, the
# node and every session stay.
kill -9 "$(cat /run/luo.pid)"
for _ in $(seq 100); do [ -e /proc/"$(cat /run/luo.pid)" ] || break; sleep 0.05; done
luo daemon --cuse --device /dev/liveupdate --state-dir /run/luo 2>>/tmp/luo.log &
echo $! > /run/luo.pid
for _ in $(seq 200); do luo status --state-dir /run/luo >/dev/null 2>&1 && break; sleep 0.05; done
[ -c /dev/liveupdate ] || fail "the device went away with the daemon"
say "daemon killed with SIGKILL and restarted; $(luo status --json --state-dir /run/luo | tr ',' '\n' | grep -c '"name"') sessions"
luo update --simulate --state-dir /run/luo || { cat /tmp/luo.log; fail "the simulated update failed"; }
two_stage 2 luo run --
luo shutdown --state-dir /run/luo >/dev/null
say "CUSE device: liveupdate 15/15; four two-stage selftests through a daemon SIGKILL and luo update --simulate"
