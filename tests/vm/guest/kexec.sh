# `luo kexec`: the daemon (CUSE, in-kernel LUO off, kho=on) carries its
# sessions across a real kexec through kmod-shim. Failed kexecs (a bad kernel
# image, a freeze that fails, a daemon killed while stashing) leave every
# session and page in place first.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
if [ "$RIG_STAGE" = 2 ]; then
  # No huge pages in the new kernel yet: the hugetlb guest RAM must wait in
  # its stash, not be lost.
  echo 0 > /proc/sys/vm/nr_hugepages
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

  # The daemon killed (SIGKILL) with the stash half done: `luo kexec` fails
  # and says so, and the next daemon withdraws the two stashes from
  # kmod-shim and finds everything as it was, unfrozen.
  kill -TERM "$(cat /tmp/daemon.pid)"
  for _ in $(seq 100); do [ -e /proc/"$(cat /tmp/daemon.pid)" ] || break; sleep 0.05; done
  LUO_CRASH_AT=stashed:2 luo daemon --device /dev/liveupdate --state-dir /run/luo --cuse 2>>/tmp/luo.log &
  crashing=$!
  for _ in $(seq 200); do luo status --state-dir /run/luo >/dev/null 2>&1 && break; sleep 0.05; done
  if luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
       --state-dir /run/luo 2>/tmp/err; then fail "the kexec went on without its daemon"; fi
  wait "$crashing"
  code=$?
  [ "$code" = 137 ] || fail "the daemon meant to die while stashing exited with $code"
  say "daemon killed with the stash half done; luo kexec: $(cat /tmp/err)"
  start_daemon /dev/liveupdate /run/luo --cuse
  grep -q "withdrew 2 stashes" /tmp/luo.log || { cat /tmp/luo.log; fail "the killed daemon's stashes were not withdrawn"; }
  [ "$(sessions)" = "$before" ] || fail "$(sessions) sessions after the killed kexec, $before before"
  luo run -- luo hold-resized --device /dev/liveupdate --name after-crash --hugetlb \
    || fail "sessions are frozen after the killed kexec"
  for p in $(pidof luo); do tr '\0' ' ' < /proc/$p/cmdline | grep -q hold-resized && kill $p; done
  for _ in $(seq 50); do [ "$(sessions)" = "$before" ] && break; sleep 0.1; done
  [ "$(sessions)" = "$before" ] || fail "$(sessions) sessions after the killed kexec, $before before"
  say "after a daemon killed mid-stash: stashes withdrawn, $before sessions, unfrozen"

  luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
    --state-dir /run/luo || { cat /tmp/luo.log; fail "luo kexec failed"; }
  fail "luo kexec returned"
fi
grep -E "after kexec|restored|stash" /tmp/luo.log
[ "$(grep -c "after kexec" /tmp/luo.log)" = 1 ] || fail "not exactly one daemon rebuilt the sessions"
grep -q "stays in its kmod-shim stash: it needs 32 free 2 MiB huge pages and 0 are free" /tmp/luo.log \
  || fail "the hugetlb memfd did not wait for huge pages"
luo status --state-dir /run/luo | grep -q "token 0x1 memfd-hugetlb-v1 (in its kmod-shim stash until 32 2 MiB huge pages are free)" \
  || { luo status --state-dir /run/luo; fail "luo status does not show the waiting file"; }
# The daemon killed and started again: what waits is in the journal.
kill -9 "$(cat /tmp/daemon.pid)"
for _ in $(seq 100); do [ -e /proc/"$(cat /tmp/daemon.pid)" ] || break; sleep 0.05; done
start_daemon /dev/liveupdate /run/luo --cuse
two_stage 2 luo run --
luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 256 --extra-sessions 0 --backing shmem \
  || fail "the VMM (shmem) did not get its RAM back"
if luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 64 --extra-sessions 0 --backing hugetlb \
     >/tmp/out 2>&1; then fail "hugetlb guest RAM retrieved without huge pages"; fi
grep -q "Cannot allocate memory" /tmp/out || { cat /tmp/out; fail "no ENOMEM for RAM waiting for huge pages"; }
say "hugetlb guest RAM with no huge pages free: $(grep -i "cannot allocate" /tmp/out | head -1)"
echo 64 > /proc/sys/vm/nr_hugepages
luo run -- luo demo-vmm --device /dev/liveupdate --stage 2 --size-mib 64 --extra-sessions 0 --backing hugetlb \
  || fail "the VMM (hugetlb) did not get its RAM back"
grep -q "rebuilt from its stash (64 MiB)" /tmp/luo.log || fail "no rebuild line"
say "hugetlb guest RAM waited in its stash for huge pages, then came back whole"
say "luo kexec: four two-stage selftests and 256 MiB shmem + 64 MiB hugetlb guest RAM across a real kexec"
