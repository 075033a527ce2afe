# Baseline: the selftests against the in-kernel LUO (liveupdate=on kho=on),
# the two-stage ones across a real KHO kexec.
. /rig/lib.sh
[ -c /dev/liveupdate ] || fail "no in-kernel /dev/liveupdate (is liveupdate=on?)"
if [ "$RIG_STAGE" = 1 ]; then
  liveupdate_15_of_15
  two_stage 1
  kexec_to_stage2
fi
two_stage 2
say "in-kernel LUO: liveupdate 15/15; four two-stage selftests across a real kexec"
