#!/bin/bash
# Fetches systemd's `test-luo` from Debian sid (package systemd-tests) with
# what it runs on (libsystemd-shared, and sid's libc6, as sid's binaries need
# a newer glibc than the host may have), without touching the machine's apt
# sources or installing anything: the packages are unpacked into
# $LUO_TEST_CACHE/systemd/VERSION (default cache /var/cache/luo-test).
# Prints that directory; `run-test-luo.sh` runs the binary from it, unmodified,
# through the unpacked dynamic loader.
set -euo pipefail
. "$(dirname "$0")/sid-apt.sh"

ver=$(apt-cache "${O[@]}" policy systemd-tests | awk '/Candidate:/ {print $2}')
case "$ver" in
  ""|"(none)") log "no systemd-tests in sid"; exit 1 ;;
esac
major=${ver%%.*}
if [ "$major" -lt 262 ] 2>/dev/null; then
  log "sid has systemd $ver; test-luo needs 262 or later"
  exit 1
fi
root=$CACHE/systemd/$ver
if [ ! -f "$root/.unpacked" ]; then
  rm -rf "$root" && mkdir -p "$root/debs"
  log "downloading systemd-tests, libsystemd-shared and libc6 from sid (systemd $ver)"
  for pkg in systemd-tests libsystemd-shared libc6; do
    pver=$(apt-cache "${O[@]}" policy "$pkg" | awk '/Candidate:/ {print $2}')
    deb=$(ls "$APT"/dl/"${pkg}"_"${pver//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      (cd "$APT/dl" && rm -f "${pkg}"_*.deb && apt-get "${O[@]}" download "$pkg" >&2)
      deb=$(ls "$APT"/dl/"${pkg}"_*.deb | head -1)
    fi
    dpkg-deb -x "$deb" "$root"
  done
  rmdir "$root/debs"
  test -x "$root/usr/lib/systemd/tests/unit-tests/manual/test-luo" \
    || { log "systemd-tests $ver has no manual/test-luo"; exit 1; }
  touch "$root/.unpacked"
fi
echo "$root"
