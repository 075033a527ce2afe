#!/bin/bash
# Builds the rig's initramfs: busybox, the guest scripts, `luo`, the kernel's
# LUO selftests, kexec, and the guest kernel itself (for kexec). Two archives:
# OUT.stage2 has everything; OUT also holds OUT.stage2 as /boot/initramfs,
# which the first boot hands to the kernel it kexecs into.
#
# Usage: make-initramfs.sh OUT BZIMAGE LUO SELFTEST_DIR [SHIM_KO [SYSTEMD_ROOT]]
# SYSTEMD_ROOT (from tests/scripts/fetch-systemd.sh) adds systemd's test-luo
# with sid's loader and the libraries it needs, run by /rig/test-luo.
set -euo pipefail
OUT=$1; KERNEL=$2; LUO=$3; ST=$4; SHIM=${5:-}; SYSTEMD=${6:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,boot,rig/selftests,lib64,etc}

# A binary and the shared libraries it needs, at the same paths.
add() {
  local bin=$1 dest=$2
  mkdir -p "$root/$(dirname "$dest")"
  strip -o "$root/$dest" "$bin" 2>/dev/null || cp "$bin" "$root/$dest"
  ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done
}

cp "$(command -v busybox)" "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
done
add "$LUO" /usr/bin/luo
add "$(command -v kexec)" /usr/sbin/kexec
for t in liveupdate luo_kexec_simple luo_multi_session luo_stress_sessions luo_stress_files; do
  add "$ST/$t" "/rig/selftests/$t"
done
cp "$here"/guest/*.sh "$root/rig/"
install -m 755 "$here/guest/init" "$root/init"
cp "$KERNEL" "$root/boot/bzImage"
[ -z "$SHIM" ] || cp "$SHIM" "$root/rig/luo_shim.ko"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
if [ -n "$SYSTEMD" ]; then
  lib=usr/lib/x86_64-linux-gnu
  for f in usr/lib64/ld-linux-x86-64.so.2 $lib/libc.so.6 $lib/libm.so.6 \
           $lib/systemd/libsystemd-shared-262.so usr/lib/systemd/tests/unit-tests/manual/test-luo; do
    mkdir -p "$root/opt/systemd/$(dirname "$f")"
    cp -L "$SYSTEMD/$f" "$root/opt/systemd/$f"
  done
  cat > "$root/rig/test-luo" <<'WRAP'
#!/bin/sh
# systemd's test-luo as shipped, through sid's loader and libraries.
L=/opt/systemd/usr/lib/x86_64-linux-gnu
exec /opt/systemd/usr/lib64/ld-linux-x86-64.so.2 --library-path "$L:$L/systemd" \
  /opt/systemd/usr/lib/systemd/tests/unit-tests/manual/test-luo "$@"
WRAP
  chmod 755 "$root/rig/test-luo"
fi

pack() { (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$1"; }
pack "$OUT.stage2"
cp "$OUT.stage2" "$root/boot/initramfs"
pack "$OUT"
