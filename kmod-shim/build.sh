#!/bin/bash
# Builds luo_shim.ko out of tree against a kernel build directory (the rig's:
# see tests/vm/build-kernel.sh) and prints its path.
# Usage: build.sh KERNEL_BUILD_DIR [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KDIR=$1
OUT=${2:-$KDIR/luo-shim}
mkdir -p "$OUT"
cp "$here"/Kbuild "$here"/luo_shim.c "$here"/luo_shim_uapi.h "$OUT/"
make -s -C "$KDIR" M="$OUT" W=1 modules >&2
echo "$OUT/luo_shim.ko"
