# `luo kexec`: the daemon (CUSE, in-kernel LUO off, kho=on) carries its
# sessions across a real kexec through kmod-shim. Failed kexecs (a bad kernel
# image, a freeze that fails) leave every session and page in place first.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
if [ "$RIG_STAGE" = 2 ]; then
  # A daemon killed while it rebuilds the sessions (after three files): the
  # stashes stay in kmod-shim until the new memfds are saved, so the next
  # daemon rebuilds every one (those the first had filled in place by
  # copying).
  LUO_CRASH_AT=restored:3 luo daemon --device /dev/liveupdate --state-dir /run/luo --cuse 2>>/tmp/luo.log
  code=$?
  [ "$code" = 137 ] || fail "the daemon meant to die while rebuilding exited with $code"
  say "a daemon killed (SIGKILL) while rebuilding the sessions"
fi
start_daemon /dev/liveupdate /run/luo --cuse
sessions() { luo status --json --state-dir /run/luo | tr ',' '\n' | grep -c '"name"'; }
if [ "$RIG_STAGE" = 1 ]; then
  two_stage 1 luo run --
  luo run -- luo demo-vmm --device /dev/liveupdate --stage 1 --size-mib 256 --extra-sessions 0 --backing shmem \
    || fail "the VMM (shmem) failed"
  luo run -- luo demo-vmm --device /dev/liveupdate --stage 1 --size-mib 64 --extra-sessions 0 --backing hugetlb \
    || fail "the VMM (hugetlb) failed"
  before=$(sessions)
  say "$before sessions before the kexec"

  # A bad kernel image: refused before anything is frozen.
  echo "not a kernel" > /tmp/bogus
  if luo kexec --kernel /tmp/bogus --reuse-cmdline --state-dir /run/luo 2>/tmp/err; then fail "a bad image was kexec'd"; fi
  say "bad image: $(cat /tmp/err)"
  [ "$(sessions)" = "$before" ] || fail "sessions changed after a refused image"

  # A preserved shmem memfd's size is fixed at once (kmod-shim's FREEZE), as
  # the kernel fixes it.
  if luo run -- luo hold-resized --device /dev/liveupdate --name fixed 2>/tmp/err; then
    fail "a preserved shmem memfd was resized"
  fi
  grep -q "ftruncate: Operation not permitted" /tmp/err || fail "resizing a preserved memfd: $(cat /tmp/err)"
  say "resizing a preserved shmem memfd: EPERM at once"

  # A freeze that fails (hugetlb sizes are not fixed): everything unfrozen,
  # nothing stashed.
  luo run -- luo hold-resized --device /dev/liveupdate --name resized --hugetlb || fail "hold-resized failed"
  if luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
       --state-dir /run/luo 2>/tmp/err; then fail "a refused freeze was kexec'd"; fi
  say "refused freeze: $(cat /tmp/err)"
  grep -q "nothing changed" /tmp/err || fail "the refusal does not say nothing changed"
  # Unfrozen: a new session takes a file again.
  luo run -- luo hold-resized --device /dev/liveupdate --name after-refusal --hugetlb \
    || fail "sessions are frozen after the refused kexec"
  for p in $(pidof luo); do tr '\0' ' ' < /proc/$p/cmdline | grep -q hold-resized && kill $p; done
  for _ in $(seq 50); do [ "$(sessions)" = "$before" ] && break; sleep 0.1; done
  [ "$(sessions)" = "$before" ] || fail "$(sessions) sessions after the refused kexecs, $before before"
  say "after two refused kexecs: $before sessions, unfrozen"

  luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
    --state-dir /run/luo || { cat /tmp/luo.log; fail "luo kexec failed"; }
  fail "luo kexec returned"
fi
grep -E "after kexec|restored" /tmp/luo.log
[ "$(grep -c "after kexec" /tmp/luo.log)" = 1 ] || fail "not exactly one daemon rebuilt the sessions"
two_stage 2 luo run --
luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 256 --extra-sessions 0 --backing shmem \
  || fail "the VMM (shmem) did not get its RAM back"
luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 64 --extra-sessions 0 --backing hugetlb \
  || fail "the VMM (hugetlb) did not get its RAM back"
say "luo kexec: four two-stage selftests and 256 MiB shmem + 64 MiB hugetlb guest RAM across a real kexec"
