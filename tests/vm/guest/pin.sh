# A stash that cannot pin: with movablecore= every memfd folio is allocated
# in ZONE_MOVABLE, so kmod-shim must migrate each one to pin it. One session
# holds a memfd with a page spliced into a pipe (the pipe's reference stops
# that folio's migration). `luo kexec` must be refused with the module's
# errno, nothing left stashed, every session in place, and a VMM's guest RAM
# (preserved and pinned before the failing file) whole afterwards.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod failed"
start_daemon /dev/liveupdate /run/luo --cuse
sessions() { luo status --json --state-dir /run/luo | tr ',' '\n' | grep -c '"name"'; }
say "$(grep -A3 'zone.*Movable' /proc/zoneinfo | tr -s ' ' | tr '\n' ' ')"
luo run -- luo demo-vmm --device /dev/liveupdate --stage 1 --size-mib 64 --extra-sessions 0 --backing shmem \
  || fail "the VMM failed"
luo run -- luo hold-spliced --device /dev/liveupdate --name spliced || fail "hold-spliced failed"
before=$(sessions)
# A stash holds the module (as does an open /dev/luo-shim): its count must
# come back to what it was.
refs=$(cat /sys/module/luo_shim/refcnt)
if luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
     --state-dir /run/luo 2>/tmp/err; then
  fail "kexec'd with a folio that cannot be pinned"
fi
say "unpinnable folio: $(cat /tmp/err)"
grep -q "nothing changed" /tmp/err || fail "the refusal does not say nothing changed"
grep -q "session spliced token 0x1 cannot be stashed" /tmp/err || fail "the refusal does not name the file"
[ "$(cat /sys/module/luo_shim/refcnt)" = "$refs" ] || fail "kmod-shim still holds stashes"
[ "$(sessions)" = "$before" ] || fail "$(sessions) sessions after the refusal, $before before"
dmesg | grep -q "WARNING" && { dmesg | grep -A3 WARNING | head -20; fail "the kernel warned"; }
luo update --simulate --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the update after the refusal failed"; }
luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 64 --extra-sessions 0 --backing shmem \
  || fail "the VMM did not get its RAM back"
say "pin: refused with $before sessions in place, nothing stashed, guest RAM whole"
