#!/bin/bash
# Builds the kernel's LUO selftests from the newest linux-source-7.* in Debian
# sid that has kernel/liveupdate/, without touching the machine's apt sources.
# Prints the directory holding the built binaries. Everything is cached under
# $LUO_TEST_CACHE (default /var/cache/luo-test), keyed by package version.
set -euo pipefail
. "$(dirname "$0")/sid-apt.sh"

candidates=$(apt-cache "${O[@]}" search --names-only '^linux-source-7\.[0-9]+$' | cut -d' ' -f1 | sort -t. -k2 -n -r)
[ -n "$candidates" ] || { log "no linux-source-7.* package in sid"; exit 1; }
for pkg in $candidates; do
  ver=$(apt-cache "${O[@]}" policy "$pkg" | awk '/Candidate:/ {print $2}')
  src=$CACHE/src/${pkg}_$ver
  # (.extracted-2: trees from before kept the kernel's own usr/ directory out)
  if [ ! -f "$src/.extracted-2" ]; then
    deb=$(ls "$APT"/dl/"${pkg}"_"${ver//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      log "downloading $pkg $ver"
      (cd "$APT/dl" && rm -f "${pkg}"_*.deb && apt-get "${O[@]}" download "$pkg" >&2)
      deb=$(ls "$APT"/dl/"${pkg}"_*.deb | head -1)
    fi
    rm -rf "$src" "$src.deb" && mkdir -p "$src" "$src.deb"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$src.deb" --wildcards './usr/src/*.tar.xz'
    tar -xJf "$src.deb"/usr/src/*.tar.xz -C "$src" --strip-components=1
    rm -rf "$src.deb"
    touch "$src/.extracted-2"
  fi
  if [ ! -d "$src/kernel/liveupdate" ]; then
    log "$pkg $ver has no kernel/liveupdate/; trying an older one"
    continue
  fi
  out=$CACHE/build/${pkg}_$ver
  if [ ! -x "$out/bin/liveupdate" ]; then
    log "building selftests of $pkg $ver"
    # Out of tree, so that the same source can also build the guest kernel.
    make -s -C "$src" O="$out/obj" headers_install INSTALL_HDR_PATH="$out/headers" >&2
    mkdir -p "$out/bin"
    make -s -C "$src/tools/testing/selftests/liveupdate" OUTPUT="$out/bin" \
      KHDR_INCLUDES="-isystem $out/headers/include" >&2
  fi
  echo "$out/bin"
  exit 0
done
log "no linux-source-7.* in sid has kernel/liveupdate/"
exit 1
