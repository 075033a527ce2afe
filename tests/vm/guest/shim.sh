# kmod-shim across a real kexec (in-kernel LUO off, kho=on): a 256 MiB shmem
# memfd and a 64 MiB hugetlb memfd written with a pattern come back identical,
# with size, position and seals; the module refuses to unload while it holds
# stashes.
. /rig/lib.sh
[ -f /rig/luo_shim.ko ] || fail "no luo_shim.ko in the initramfs"
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
[ -c /dev/luo-shim ] || fail "no /dev/luo-shim"
if [ "$RIG_STAGE" = 1 ]; then
  luo shim-check --stage 1 --shmem-mib "$(arg rig.shmem_mib 256)" --hugetlb-mib "$(arg rig.hugetlb_mib 64)" \
    || fail "stage 1 of the shim check failed"
  if rmmod luo_shim 2>/dev/null; then fail "the module unloaded while holding stashes"; fi
  say "the module refuses to unload while it holds stashes"
  kexec_to_stage2
fi
dmesg | grep luo-shim
luo shim-check --stage 2 || fail "stage 2 of the shim check failed"
rmmod luo_shim || fail "rmmod after release failed"
say "kmod-shim: shmem and hugetlb memfds came back across a real kexec"
