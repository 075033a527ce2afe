#!/bin/bash
# Boots the guest under TCG with one scenario and prints its console. Exits 0
# if the guest printed "RIG-VERDICT PASS", 1 otherwise; a guest still running
# after TIMEOUT seconds is killed and reported as hung.
#
# Usage: boot.sh BZIMAGE INITRAMFS SCENARIO TIMEOUT [KERNEL ARGS...]
# (guest memory: $RIG_MEM, default 3G; extra QEMU arguments: $RIG_QEMU_ARGS)
set -uo pipefail
KERNEL=$1; INITRD=$2; SCENARIO=$3; TIMEOUT=$4; shift 4
# One guest at a time on this machine, whoever boots it: a TCG guest beside
# another runs several times slower, past the selftests' 30 s per case.
CACHE=${LUO_TEST_CACHE:-/var/cache/luo-test}
mkdir -p "$CACHE"
exec 8>"$CACHE/.guest-lock"
flock 8
log=$(mktemp)
# shellcheck disable=SC2086 # word splitting of the extra arguments is wanted
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m "${RIG_MEM:-3G}" ${RIG_QEMU_ARGS:-} \
  -nographic -no-reboot -nodefaults -serial stdio \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "console=ttyS0 panic=-1 oops=panic rig.scenario=$SCENARIO $*" > "$log" 2>&1
status=$?
cat "$log"
if grep -q "^RIG-VERDICT PASS $SCENARIO" "$log"; then
  rm -f "$log"; exit 0
fi
if [ $status -eq 124 ] || [ $status -eq 137 ]; then
  echo "RIG: the guest hung; killed after $TIMEOUT s"
fi
rm -f "$log"
exit 1
