# The differential oracle: the same corpus against the in-kernel LUO
# (/dev/liveupdate, across a real kexec) and against the CUSE device
# (/dev/luo-cuse, across a simulated update) in one guest. The host compares
# the ORACLE lines. kmod-shim is loaded, so the daemon fixes preserved
# memfds' sizes as the kernel does.
. /rig/lib.sh
if [ "$RIG_STAGE" = 1 ]; then
  insmod /rig/luo_shim.ko || fail "insmod failed"
  luo daemon --cuse --device /dev/luo-cuse --state-dir /run/luo 2>/tmp/luo.log &
  for _ in $(seq 200); do luo status --state-dir /run/luo >/dev/null 2>&1 && break; sleep 0.05; done
  luo status --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the daemon did not start"; }
  luo oracle --device /dev/liveupdate --phase 1 --label kernel
  luo run --device /dev/luo-cuse -- luo oracle --device /dev/luo-cuse --phase 1 --label cuse
  luo update --simulate --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the simulated update failed"; }
  luo run --device /dev/luo-cuse -- luo oracle --device /dev/luo-cuse --phase 2 --label cuse
  kexec_to_stage2
fi
luo oracle --device /dev/liveupdate --phase 2 --label kernel
