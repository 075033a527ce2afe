# Where an earlier kmod-shim lost folios: a large guest with large KHO scratch
# areas, the in-kernel LUO and kmod-shim each carrying rig.mib MiB (default
# 1024) across the same kexec, their memfds filled while a pressure file holds
# much of the rest of memory, so that movable folios land in scratch (CMA):
# the allocator takes movable pages from CMA first once CMA holds over half of
# the free memory. The guest
# kernel has CONFIG_KEXEC_HANDOVER_DEBUG=y: a folio preserved in scratch is
# refused there and then. After the kexec every word of both memfds is
# compared with what was written.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod failed"
MIB=$(arg rig.mib 1024)
PRESSURE=$(arg rig.pressure_mib 1024)
if [ "$RIG_STAGE" = 1 ]; then
  mkdir -p /pressure && mount -t tmpfs -o size=$((PRESSURE + 16))m pressure /pressure \
    || fail "cannot mount the pressure tmpfs"
  dd if=/dev/zero of=/pressure/fill bs=1M count="$PRESSURE" || fail "no room for the pressure file"
  say "pressure: $PRESSURE MiB; $(grep -E 'MemFree|CmaFree|CmaTotal' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
  luo bench --device /dev/liveupdate --stage 1 --session scratch --calls 1 --sizes-kib $((MIB * 1024)) --sessions 1 --files 1 >/dev/null \
    || fail "kernel side failed"
  luo shim-check --stage 1 --shmem-mib "$MIB" --hugetlb-mib 0 \
    || { dmesg | tail -30; fail "shim stage 1 failed"; }
  umount /pressure
  moved=$(dmesg | sed -n 's/.*luo_shim: token [0-9]*: \([0-9]*\) of \([0-9]*\) folios moved.*/\1 of \2/p' | tail -1)
  say "kmod-shim: folios moved out of CMA/ZONE_MOVABLE to be pinned: ${moved:-0}"
  dmesg | grep -q "WARNING" && { dmesg | grep -A3 WARNING | head -20; fail "the kernel warned"; }
  kexec_to_stage2
fi
luo shim-check --stage 2 || fail "shim stage 2 failed"
luo bench --device /dev/liveupdate --stage 2 --session scratch --calls 1 --sizes-kib $((MIB * 1024)) --sessions 1 --files 1 >/dev/null \
  || fail "kernel side stage 2 failed"
dmesg | grep -q "WARNING" && { dmesg | grep -A3 WARNING | head -20; fail "the new kernel warned"; }
say "scratch: both came back whole"
