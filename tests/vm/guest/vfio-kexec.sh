# VFIO devices across a real `luo kexec` (kmod-shim, in-kernel LUO off,
# kho=on): the kexec resets the device and stops its DMA; the next kernel's
# daemon binds it to vfio-pci again, makes its iommufd anew with guest RAM
# mapped at the same IOVAs, and hands the next VMM a device that DMAs with
# no setup. Every DMA'd byte is checked. A second device, removed before the
# next kernel's daemon starts, fails only its own retrieve.
. /rig/lib.sh
insmod /rig/luo_shim.ko || fail "insmod luo_shim.ko failed"
flb() { luo status --json --state-dir /run/luo | grep -A4 '"compatible": "iommufd-dma-v1"'; }
if [ "$RIG_STAGE" = 1 ]; then
  bind_edus
  start_daemon /dev/liveupdate /run/luo --cuse
  luo run -- luo vfio-check --stage 1 --kexec --device /dev/liveupdate --ram-mib 256 > /tmp/vmm1 2>&1 \
    || { cat /tmp/vmm1 /tmp/luo.log; fail "stage 1 of the handover failed"; }
  sed 's/^/RIG: /' /tmp/vmm1
  luo status --state-dir /run/luo | sed 's/^/RIG: /'
  luo kexec --kernel /boot/bzImage --initrd /boot/initramfs --reuse-cmdline --append rig.stage=2 \
    --state-dir /run/luo || { cat /tmp/luo.log; fail "luo kexec failed"; }
  fail "luo kexec returned"
fi
# Nothing in this kernel bound the edus to vfio-pci: the daemon does, as it
# takes over the previous kernel's state.
for bdf in 0000:00:01.0 0000:00:02.0; do
  [ -e /sys/bus/pci/devices/$bdf/vfio-dev ] && fail "$bdf is bound to vfio-pci before the daemon started"
done
# The spare is gone in this kernel: only its own retrieve may fail.
echo 1 > /sys/bus/pci/devices/0000:00:02.0/remove
start_daemon /dev/liveupdate /run/luo --cuse
grep -E "after kexec|VFIO file" /tmp/luo.log | sed 's/^/RIG: /'
grep -q "1 VFIO devices bound again, 1 iommufds with 256 MiB mapped made anew" /tmp/luo.log \
  || { cat /tmp/luo.log; fail "the daemon did not make the device and its iommufd again"; }
grep -q "the VFIO file did not come back (no device at 0000:00:02.0); retrieving it fails with ENODEV" /tmp/luo.log \
  || { cat /tmp/luo.log; fail "no log line says the removed spare did not come back"; }
luo status --state-dir /run/luo | sed 's/^/RIG: /'
flb | grep -q '"incoming": 3' || { flb; fail "the iommufd FLB did not come across the kexec"; }
# The daemon killed and started again: the rebuilt device and iommufd are
# with the keeper, their record in the journal.
kill -9 "$(cat /tmp/daemon.pid)"
for _ in $(seq 100); do [ -e /proc/"$(cat /tmp/daemon.pid)" ] || break; sleep 0.05; done
start_daemon /dev/liveupdate /run/luo --cuse
[ "$(grep -c "VFIO devices bound again" /tmp/luo.log)" = 1 ] || fail "the restarted daemon made the devices again"
luo status --state-dir /run/luo | grep -q "0000:00:01.0, /dev/vfio/devices/vfio0, DMA through the iommufd at vfio-vm token 3" \
  || { luo status --state-dir /run/luo; fail "the device lost its iommufd across a daemon restart"; }
out=$(luo run -- luo vfio-check --stage 2 --kexec --spare-removed --device /dev/liveupdate 2>&1) \
  || { echo "$out"; cat /tmp/luo.log; fail "stage 2 of the handover failed"; }
echo "$out" | sed 's/^/RIG: /'
flb | grep -q '"incoming": 0' || { flb; fail "the iommufd FLB was not finished with the last device"; }
say "vfio-kexec: the device, reset by a real kexec, made again by LUO and DMAing through the same IOVAs"
