# `luo bench` against the in-kernel LUO (across a real kexec), the CUSE
# device and the FUSE-file device, in one guest; or, with rig.part=shim, the
# kexec case of kmod-shim (stash before, restore after a kexec) in a boot of
# its own with the in-kernel LUO off; or, with rig.part=memory, guest RAM
# (rig.sizes, shmem, plus rig.hugetlb_mib of hugetlb) carried by the in-kernel
# LUO and by kmod-shim across the same kexec, with the module's pin and
# preserve times (SHIMTIME lines). Prints BENCH lines for
# `luo bench --compare`, labelled with rig.label's suffix. The plan comes
# from the command line (rig.calls, rig.sizes, rig.sessions, rig.files).
. /rig/lib.sh
SIZES=$(arg rig.sizes 4,1024,65536,262144,1048576)
SUFFIX=$(arg rig.label "")
if [ "$(arg rig.part devices)" = memory ]; then
  insmod /rig/luo_shim.ko timing=1 || fail "insmod luo_shim.ko failed"
  HUGE=$(arg rig.hugetlb_mib 64)
  K="--calls 1 --sizes-kib $SIZES --sessions 1 --files 1"
  if [ "$RIG_STAGE" = 1 ]; then
    out=$(luo bench --device /dev/liveupdate $K --stage 1 --session mem) || fail "the kernel's preserve failed"
    echo "BENCH kernel$SUFFIX $out"
    out=$(luo shim-check --stage 1 --bench-sizes-kib "$SIZES" --bench-hugetlb-mib "$HUGE") \
      || fail "stash through kmod-shim failed"
    echo "BENCH kmod-shim$SUFFIX $out"
    dmesg | sed -n "s/.*luo_shim: \(token .*pinned in.*\)/SHIMTIME$SUFFIX \1/p"
    kexec_to_stage2
  fi
  out=$(luo bench --device /dev/liveupdate $K --stage 2 --session mem) || fail "the kernel's retrieve failed"
  echo "BENCH kernel$SUFFIX $out"
  out=$(luo shim-check --stage 2 --bench-sizes-kib "$SIZES") || fail "restore through kmod-shim failed"
  echo "BENCH kmod-shim$SUFFIX $out"
  dmesg | sed -n "s/.*luo_shim: \(token .*adopted in.*\)/SHIMTIME$SUFFIX \1/p"
  exit 0
fi
if [ "$(arg rig.part devices)" = shim ]; then
  insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
  out=$(luo shim-check --stage "$RIG_STAGE" --bench-sizes-kib "$SIZES") \
    || fail "stage $RIG_STAGE through kmod-shim failed"
  echo "BENCH kmod-shim $out"
  [ "$RIG_STAGE" = 1 ] && kexec_to_stage2
  exit 0
fi
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
  kexec_to_stage2
fi
out=$(luo bench --device /dev/liveupdate $P --stage 2 --session rig) || fail "bench stage 2 on the kernel's device failed"
echo "BENCH kernel $out"
