#!/bin/bash
# Boots the rig's bench scenario and prints the side-by-side table: the
# in-kernel LUO (across a real kexec), the CUSE device and the FUSE-file
# device, measured by the same `luo bench` workload in one guest, then, in a
# second boot, kmod-shim's stash and restore of the same memfd sizes across a
# kexec; then guest RAM (1 GiB shmem and 64 MiB hugetlb) carried by the
# in-kernel LUO and kmod-shim across one kexec, once as allocated and once
# with every folio in ZONE_MOVABLE (movablecore=), so that the module must
# migrate each one to pin it (PARTS=memory: only these). Extra
# arguments go on the kernel command line (rig.calls=N rig.sizes=KIB,...
# rig.sessions=N rig.files=N); the console is kept in $LOG (default
# /tmp/luo-rig-bench.log).
set -euo pipefail
ARGS=("$@")
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
LOG=${LOG:-/tmp/luo-rig-bench.log}
(cd "$top" && cargo build --release --bin luo >&2)
K=$("$here/build-kernel.sh")
ST=$("$top/tests/scripts/fetch-selftests.sh")
init=$(mktemp -d)
trap 'rm -rf "$init"' EXIT
shim=$("$top/kmod-shim/build.sh" "$(dirname "$(dirname "$(dirname "$(dirname "$K")")")")" "$init/shim")
"$here/make-initramfs.sh" "$init/initramfs.gz" "$K" "$top/target/release/luo" "$ST" "$shim"
boot() {
  RIG_MEM=${RIG_MEM:-6G} "$here/boot.sh" "$K" "$init/initramfs.gz" bench 1800 "$@" >> "$LOG" \
    || { grep -E "^RIG|luo\[" "$LOG" >&2; echo "bench: the guest failed; console in $LOG" >&2; exit 1; }
}
: > "$LOG"
if [ "${PARTS:-all}" = all ]; then
  boot liveupdate=on kho=on "${ARGS[@]}"
  boot liveupdate=off kho=on rig.part=shim "${ARGS[@]}"
  "$top/target/release/luo" bench --compare "$LOG"
fi
MEM=${MEM_SIZES:-1048576}
MEMLOG=$LOG.memory
LOG=$MEMLOG
: > "$LOG"
for b in ${MEMORY_BOOTS:-plain movable}; do
  case $b in
    plain) boot liveupdate=on kho=on rig.part=memory rig.sizes="$MEM" rig.label= ;;
    movable) boot liveupdate=on kho=on rig.part=memory rig.sizes="$MEM" rig.label=-movable movablecore=2G ;;
  esac
done
echo
"$top/target/release/luo" bench --compare "$MEMLOG"
echo
grep -a "^SHIMTIME" "$MEMLOG" | tr -d '\r' | sed 's/^SHIMTIME/kmod-shim/' 
