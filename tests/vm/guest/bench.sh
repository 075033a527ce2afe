# `luo bench` against the in-kernel LUO (across a real kexec), the CUSE
# device and the FUSE-file device, in one guest, and the kexec case of
# kmod-shim (stash before, restore after the same kexec). Prints BENCH lines
# for `luo bench --compare`. The plan comes from the command line (rig.calls,
# rig.sizes, rig.sessions, rig.files).
. /rig/lib.sh
SIZES=$(arg rig.sizes 4,1024,65536,262144,1048576)
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
P="--calls $(arg rig.calls 2000) --sizes-kib $SIZES"
P="$P --sessions $(arg rig.sessions 2000) --files $(arg rig.files 500)"
if [ "$RIG_STAGE" = 1 ]; then
  out=$(luo bench --device /dev/liveupdate $P --stage 1 --session rig) || fail "bench on the kernel's device failed"
  echo "BENCH kernel $out"
  start_daemon /dev/luo-cuse /run/luo-cuse --cuse
  out=$(luo bench --device /dev/luo-cuse $P --json) || { cat /tmp/luo.log; fail "bench on the CUSE device failed"; }
  echo "BENCH cuse $out"
  luo shutdown --state-dir /run/luo-cuse >/dev/null
  mkdir -p /tmp/fuse
  start_daemon /tmp/fuse/liveupdate /run/luo-fuse
  out=$(luo bench --device /tmp/fuse/liveupdate $P --json) || { cat /tmp/luo.log; fail "bench on the FUSE-file device failed"; }
  echo "BENCH fuse-file $out"
  luo shutdown --state-dir /run/luo-fuse >/dev/null
  out=$(luo shim-check --stage 1 --bench-sizes-kib "$SIZES") || fail "stashing through kmod-shim failed"
  echo "BENCH kmod-shim $out"
  kexec_to_stage2
fi
out=$(luo shim-check --stage 2 --bench-sizes-kib "$SIZES") || fail "restoring through kmod-shim failed"
echo "BENCH kmod-shim $out"
out=$(luo bench --device /dev/liveupdate $P --stage 2 --session rig) || fail "bench stage 2 on the kernel's device failed"
echo "BENCH kernel $out"
