# The in-kernel LUO and kmod-shim each carry a memfd (rig.mib MiB, default
# 256) across the same kexec.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod failed"
MIB=$(arg rig.mib 256)
if [ "$RIG_STAGE" = 1 ]; then
  luo bench --device /dev/liveupdate --stage 1 --session mix --calls 1 --sizes-kib $((MIB * 1024)) --sessions 1 --files 1 >/dev/null \
    || fail "kernel side failed"
  luo shim-check --stage 1 --shmem-mib "$MIB" --hugetlb-mib 0 || fail "shim stage 1 failed"
  kexec_to_stage2
fi
luo shim-check --stage 2 || fail "shim stage 2 failed"
luo bench --device /dev/liveupdate --stage 2 --session mix --calls 1 --sizes-kib $((MIB * 1024)) --sessions 1 --files 1 >/dev/null \
  || fail "kernel side stage 2 failed"
say "mix: both came back"
