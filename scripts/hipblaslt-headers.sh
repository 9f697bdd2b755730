#!/usr/bin/env bash
# Unpacks the hipBLASLt headers (and the HIP/hipBLAS headers they include) from Debian sid into
# PREFIX (default /opt/hipblaslt-headers), for engine/ffi/hip-sys/regen.sh. Bookworm and trixie
# have no hipBLASLt; sid's packages are only unpacked (dpkg -x), never installed.
set -euo pipefail
PREFIX=${1:-/opt/hipblaslt-headers}
APT=${SID_APT_DIR:-/tmp/sid-apt}
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$PREFIX"
echo "deb http://deb.debian.org/debian sid main" > "$APT/sources.list"
o="-oDir::Etc::SourceList=$APT/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$APT/lists -oDir::Cache=$APT/cache"
apt-get $o update >/dev/null
cd "$APT"
apt-get $o download libhipblaslt-dev libhipblas-common-dev libhipblas-dev libamdhip64-dev
for f in "$APT"/*.deb; do dpkg -x "$f" "$PREFIX"; done
echo "hipBLASLt headers in $PREFIX/usr/include/hipblaslt"
