# VFIO devices through their cdev and an iommufd: two of QEMU's edu
# (1234:11e8), behind an emulated intel-iommu, bound to vfio-pci; DMA into and
# out of a memfd checked byte for byte, and an unmapped IOVA reads nothing.
. /rig/lib.sh
bind_edus
out=$(luo vfio-check --stage 0 --vfio /dev/vfio/devices/vfio0 --iommu /dev/iommu --ram-mib 64 2>&1) \
  || { echo "$out"; dmesg | tail -20; fail "vfio-check failed"; }
echo "$out" | sed 's/^/RIG: /'
dmesg | grep -i -E "DMAR.*fault" | tail -3 | sed 's/^/RIG: /'
# The same device handed over by a simulated update: a VMM sets it up,
# preserves guest RAM, the device and its iommufd, and is ended by the
# update; the next VMM retrieves them and DMAs with no setup.
start_daemon /dev/liveupdate /run/luo --cuse
luo run -- luo vfio-check --stage 1 --device /dev/liveupdate --ram-mib 64 > /tmp/vmm1 2>&1 \
  || { cat /tmp/vmm1 /tmp/luo.log; fail "stage 1 of the handover failed"; }
sed 's/^/RIG: /' /tmp/vmm1
# The refused devices are named in the daemon's log, with why.
for why in "maps process memory" "maps a file at IOVA 0x1000000" ; do
  grep "VFIO device .* not preserved: its iommufd $why" /tmp/luo.log | sed 's/^/RIG: /' | grep -q . \
    || { cat /tmp/luo.log; fail "no log line says a device was refused because its iommufd $why"; }
done
luo status --state-dir /run/luo | sed 's/^/RIG: /'
# The iommufd FLB: held by the two devices and the iommufd, with the one
# mapping of guest RAM; each device says which iommufd its DMA goes through.
flb() { luo status --json --state-dir /run/luo | grep -A4 '"compatible": "iommufd-dma-v1"'; }
flb | grep -q '"outgoing": 3' || { flb; fail "the iommufd FLB is not held by both devices and the iommufd"; }
flb | grep -q '1 mapping(s) of 64 MiB' || { flb; fail "the iommufd FLB does not show guest RAM's mapping"; }
luo status --json --state-dir /run/luo | grep -q 'DMA through the iommufd at vfio-vm token 3' \
  || { luo status --json --state-dir /run/luo; fail "the device does not name the iommufd it depends on"; }
# The daemon killed and started again: the DMA record and the FLB are in
# its journal.
kill -9 "$(cat /tmp/daemon.pid)"
for _ in $(seq 100); do [ -e /proc/"$(cat /tmp/daemon.pid)" ] || break; sleep 0.05; done
start_daemon /dev/liveupdate /run/luo --cuse
flb | grep -q '1 mapping(s) of 64 MiB' || { flb; fail "the DMA record did not survive a daemon restart"; }
luo status --json --state-dir /run/luo | grep -q 'DMA through the iommufd at vfio-vm token 3' \
  || { luo status --json --state-dir /run/luo; fail "a device lost its iommufd across a daemon restart"; }
say "vfio: the DMA record and the iommufd FLB survive a daemon SIGKILL"
luo update --simulate --state-dir /run/luo >/dev/null || { cat /tmp/luo.log; fail "the simulated update failed"; }
flb | grep -q '"incoming": 3' || { flb; fail "the iommufd FLB did not come across the update"; }
flb | grep -q '"retrieved": false' || { flb; fail "the iommufd FLB was retrieved before any device"; }
out=$(luo run -- luo vfio-check --stage 2 --device /dev/liveupdate 2>&1) \
  || { echo "$out"; cat /tmp/luo.log; fail "stage 2 of the handover failed"; }
echo "$out" | sed 's/^/RIG: /'
flb | grep -q '"incoming": 0' || { flb; fail "the iommufd FLB was not finished with the last device"; }
say "vfio: edu DMA through iommufd checked, and handed over by a simulated update"
