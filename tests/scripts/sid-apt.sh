# Sourced by the fetch scripts: apt on Debian sid with its own lists and
# cache under $LUO_TEST_CACHE (default /var/cache/luo-test), the machine's apt
# sources untouched, one fetch at a time (tests run in parallel), lists
# refreshed at most once a day. Defines CACHE, APT, O (apt options) and log.
CACHE=${LUO_TEST_CACHE:-/var/cache/luo-test}
APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/dl"
exec 9> "$CACHE/.lock"
flock 9
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" > "$APT/sources.list"
O=(-o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" -o APT::Sandbox::User=root)
log() { echo "$(basename "$0" .sh): $*" >&2; }
if [ -z "$(find "$APT/lists" -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
  log "updating sid package lists"
  apt-get "${O[@]}" update >&2
fi
