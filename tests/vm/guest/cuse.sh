# The userspace device as a real character device through /dev/cuse; the
# two-stage selftests through `luo update --simulate`.
. /rig/lib.sh
[ ! -e /dev/liveupdate ] || fail "/dev/liveupdate exists before the daemon (liveupdate=off?)"
luo daemon --cuse --device /dev/liveupdate --state-dir /run/luo 2>/tmp/luo.log &
for _ in $(seq 200); do luo status --state-dir /run/luo >/dev/null 2>&1 && break; sleep 0.05; done
luo status --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the daemon did not start"; }
[ -c /dev/liveupdate ] || { ls -l /dev/liveupdate; cat /tmp/luo.log; fail "/dev/liveupdate is not a character device"; }
say "$(ls -l /dev/liveupdate)"
liveupdate_15_of_15 luo run --
two_stage 1 luo run --
luo update --simulate --state-dir /run/luo || { cat /tmp/luo.log; fail "the simulated update failed"; }
two_stage 2 luo run --
luo shutdown --state-dir /run/luo >/dev/null
say "CUSE device: liveupdate 15/15; four two-stage selftests through luo update --simulate"
