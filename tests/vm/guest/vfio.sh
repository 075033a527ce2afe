# A VFIO device through its cdev and an iommufd: QEMU's edu (1234:11e8),
# behind an emulated intel-iommu, bound to vfio-pci; DMA into and out of a
# memfd checked byte for byte, and an unmapped IOVA reads nothing.
. /rig/lib.sh
bdf=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
    bdf=$(basename "$d")
  fi
done
[ -n "$bdf" ] || fail "no edu device (QEMU needs -device edu)"
[ -d /sys/class/iommu ] && ls /sys/class/iommu | grep -q . || fail "no IOMMU in the guest"
say "edu at $bdf, IOMMU group $(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")"
echo vfio-pci > /sys/bus/pci/devices/$bdf/driver_override
echo "$bdf" > /sys/bus/pci/drivers_probe
for _ in 1 2 3 4 5 6 7 8 9 10; do
  [ -c /dev/vfio/devices/vfio0 ] && break
  sleep 1
done
[ -c /dev/vfio/devices/vfio0 ] || { ls -l /dev/vfio /sys/bus/pci/devices/$bdf/; fail "no /dev/vfio/devices/vfio0"; }
[ -c /dev/iommu ] || fail "no /dev/iommu"
out=$(luo vfio-check --device /dev/vfio/devices/vfio0 --iommu /dev/iommu --ram-mib 64 2>&1) \
  || { echo "$out"; dmesg | tail -20; fail "vfio-check failed"; }
echo "$out" | sed 's/^/RIG: /'
dmesg | grep -i -E "DMAR.*fault" | tail -3 | sed 's/^/RIG: /'
say "vfio: edu DMA through iommufd checked"
