# systemd 262's own LUO client, `test-luo` from Debian sid, unmodified,
# across a real `luo kexec` (kmod-shim, in-kernel LUO off, kho=on), the way
# systemd's TEST-91-LIVEUPDATE runs it: `store`, kexec, `check`; and
# `store-hijack`, kexec, `check-hijack`. `luo fdstore` plays PID 1's fd
# store and systemd-shutdown's preserve step.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
T=/rig/test-luo
[ -x "$T" ] || fail "no test-luo in the initramfs"
if [ "$RIG_STAGE" = 1 ]; then
  start_daemon /dev/liveupdate /run/luo --cuse
  # The hijacking unit first: its session named "systemd" is skipped, and
  # with it closed, the store's own session "systemd" can be made.
  luo run -- luo fdstore hold --unit hijack.service -- "$T" store-hijack > /tmp/out 2>&1 \
    || { cat /tmp/out /tmp/luo.log; fail "test-luo store-hijack failed"; }
  luo run -- luo fdstore hold -- "$T" store >> /tmp/out 2>&1 \
    || { cat /tmp/out /tmp/luo.log; fail "test-luo store failed"; }
  sed 's/^/RIG: /' /tmp/out
  luo status --state-dir /run/luo | sed 's/^/RIG: /'
  luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
    --state-dir /run/luo || { cat /tmp/luo.log; fail "luo kexec failed"; }
  fail "luo kexec returned"
fi
start_daemon /dev/liveupdate /run/luo --cuse
luo status --state-dir /run/luo | sed 's/^/RIG: /'
out=$(luo run -- luo fdstore restore -- "$T" check 2>&1) \
  || { echo "$out"; cat /tmp/luo.log; fail "test-luo check failed"; }
echo "$out" | sed 's/^/RIG: /'
case "$out" in *"kexecs count 1"*) ;; *) fail "PID 1's kexec count did not come back as 1" ;; esac
out=$(luo run -- luo fdstore restore --unit hijack.service -- "$T" check-hijack 2>&1) \
  || { echo "$out"; cat /tmp/luo.log; fail "test-luo check-hijack failed"; }
echo "$out" | sed 's/^/RIG: /'
say "systemd: test-luo store/check and store-hijack/check-hijack passed across a real kexec"
