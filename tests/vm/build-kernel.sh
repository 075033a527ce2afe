#!/bin/bash
# Builds the rig's guest kernel from the newest linux-source-7.* in Debian sid
# that has kernel/liveupdate/ (see ../scripts/fetch-selftests.sh, which also
# builds the selftests): `make tinyconfig` plus guest.config. Cached under
# $LUO_TEST_CACHE/vm, keyed by source version and fragment. Prints the path of
# the bzImage (the build directory, for out-of-tree modules, is the directory
# three levels up).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${LUO_TEST_CACHE:-/var/cache/luo-test}
bin=$("$here/../scripts/fetch-selftests.sh")
name=$(basename "$(dirname "$bin")")     # linux-source-7.2_7.2.13-1
src=$CACHE/src/$name
key=$(sha256sum "$here/guest.config" | cut -c1-12)
out=$CACHE/vm/kernel-$name-$key
log() { echo "build-kernel: $*" >&2; }
exec 9> "$CACHE/.vm-lock"
flock 9
if [ ! -f "$out/arch/x86/boot/bzImage" ] || [ ! -f "$out/.done" ]; then
  log "building the guest kernel from $name (config $key); about 5 minutes on 2 cores"
  mkdir -p "$out"
  make -s -C "$src" O="$out" tinyconfig >&2
  "$src/scripts/kconfig/merge_config.sh" -m -O "$out" "$out/.config" "$here/guest.config" >/dev/null
  make -s -C "$src" O="$out" olddefconfig >&2
  # Every option of the fragment must have survived the dependency checks.
  missing=$(grep '^CONFIG_' "$here/guest.config" | while read -r line; do
    grep -qx "$line" "$out/.config" || echo "$line"; done)
  if [ -n "$missing" ]; then
    log "options the kernel did not take: $(echo $missing)"
  fi
  make -s -C "$src" O="$out" -j"$(nproc)" bzImage >&2
  touch "$out/.done"
fi
# Module.symvers, for out-of-tree modules (kmod-shim).
if [ ! -f "$out/Module.symvers" ]; then
  make -s -C "$src" O="$out" -j"$(nproc)" modules >&2
fi
echo "$out/arch/x86/boot/bzImage"
