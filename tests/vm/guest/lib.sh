# Helpers for the rig's scenarios (sourced).
ST=/rig/selftests
TWO_STAGE="luo_kexec_simple luo_multi_session luo_stress_sessions luo_stress_files"
say() { echo "RIG: $*"; }
fail() { echo "RIG-FAIL: $*"; exit 1; }

# The upstream `liveupdate` selftest must pass 15/15; "$@" runs it (a prefix
# such as `luo run --`).
liveupdate_15_of_15() {
  out=$(cd $ST && "$@" ./liveupdate 2>&1) || { echo "$out"; cat /tmp/luo.log 2>/dev/null; fail "liveupdate selftest failed"; }
  echo "$out" | grep -q '^# Totals: pass:15 fail:0 xfail:0 xpass:0 skip:0 error:0' \
    || { echo "$out"; fail "liveupdate selftest: not 15/15"; }
  say "liveupdate selftest: 15/15"
}

# Stage $1 of every two-stage selftest; "$2..." is a prefix.
two_stage() {
  s=$1; shift
  for t in $TWO_STAGE; do
    out=$(cd $ST && "$@" ./$t --stage "$s" 2>&1) || { echo "$out"; cat /tmp/luo.log 2>/dev/null; fail "$t stage $s failed"; }
    say "$t stage $s passed"
  done
}

# kexec into the same kernel with the stage-2 initramfs.
kexec_to_stage2() {
  kexec -l -s --reuse-cmdline --append="rig.stage=2" --initrd=/boot/initramfs /boot/bzImage \
    || fail "kexec -l failed"
  say "kexec into stage 2"
  kexec -e
  fail "kexec -e returned"
}

# Centiseconds since boot.
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }

# The value of NAME=VALUE on the kernel command line ($2 if absent).
arg() {
  v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1)
  echo "${v:-$2}"
}

# Starts a daemon (extra arguments: --cuse) and waits until it answers; its
# pid goes to /tmp/daemon.pid.
start_daemon() {
  dev=$1; state=$2; shift 2
  luo daemon --device "$dev" --state-dir "$state" "$@" 2>>/tmp/luo.log &
  echo $! > /tmp/daemon.pid
  for _ in $(seq 200); do luo status --state-dir "$state" >/dev/null 2>&1 && return 0; sleep 0.05; done
  cat /tmp/luo.log; fail "the daemon for $dev did not start"
}

# Binds the two edu devices (1234:11e8) to vfio-pci and waits for their
# cdevs (/dev/vfio/devices/vfio0 and vfio1) and /dev/iommu.
bind_edus() {
  [ -d /sys/class/iommu ] && ls /sys/class/iommu | grep -q . || fail "no IOMMU in the guest"
  n=0
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
      bdf=$(basename "$d")
      say "edu at $bdf, IOMMU group $(basename "$(readlink "$d/iommu_group")")"
      echo vfio-pci > "$d/driver_override"
      echo "$bdf" > /sys/bus/pci/drivers_probe
      n=$((n + 1))
    fi
  done
  [ "$n" = 2 ] || fail "$n edu devices, not 2 (QEMU needs -device edu twice)"
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -c /dev/vfio/devices/vfio1 ] && break
    sleep 1
  done
  [ -c /dev/vfio/devices/vfio1 ] || { ls -l /dev/vfio /dev/vfio/devices; fail "no /dev/vfio/devices/vfio0 and vfio1"; }
  [ -c /dev/iommu ] || fail "no /dev/iommu"
}
