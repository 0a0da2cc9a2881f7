#!/bin/sh
# Fetches the etcd server the registry tests run (issue 15): Debian's
# etcd-server package, pinned by version and SHA-256, unpacked into
# target/tools/ without installing anything into the system.
#
#   tests/tools/fetch-etcd.sh        # prints the path of the etcd binary
#
# Idempotent: with target/tools/etcd present and of the pinned package it
# only prints the path. The .deb is kept in target/tools/cache/. Needs
# apt-get (with its package lists: `apt-get update`) and dpkg-deb; exits
# non-zero with the reason on stderr when it cannot get the binary, and the
# tests then record themselves as skipped with that reason.
set -eu

VERSION='3.4.23-4+b4'
DEB="etcd-server_3.4.23-4+b4_amd64.deb"
# sha256sum of $DEB, computed once when the pin was set.
SHA256='3a9445d4560ad6de1c375756b2a17d97713df44cbd20a658c871fe108af7ef5d'

root=$(cd "$(dirname "$0")/../.." && pwd)
tools="${CARGO_TARGET_DIR:-$root/target}/tools"
cache="$tools/cache"
bin="$tools/etcd"
stamp="$tools/etcd.sha256"

if [ -x "$bin" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SHA256" ]; then
    echo "$bin"
    exit 0
fi
for tool in apt-get dpkg dpkg-deb sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "fetch-etcd: $tool is not installed (a Debian system is needed to fetch etcd-server)" >&2
        exit 1
    fi
done
if [ "$(dpkg --print-architecture 2>/dev/null)" != amd64 ]; then
    echo "fetch-etcd: the pinned package is for amd64, this is $(dpkg --print-architecture 2>/dev/null || echo 'not Debian')" >&2
    exit 1
fi
mkdir -p "$cache"
if ! [ -f "$cache/$DEB" ] || ! echo "$SHA256  $cache/$DEB" | sha256sum -c --status; then
    rm -f "$cache/$DEB"
    # apt-get download writes into the working directory; as root it
    # warns that the download is unsandboxed, which is harmless here.
    if ! (cd "$cache" && apt-get download -q "etcd-server=$VERSION" >/dev/null 2>"$cache/apt.log"); then
        echo "fetch-etcd: apt-get download etcd-server=$VERSION failed: $(tail -n 2 "$cache/apt.log" | tr '\n' ' ')" >&2
        exit 1
    fi
fi
if ! echo "$SHA256  $cache/$DEB" | sha256sum -c --status; then
    echo "fetch-etcd: $DEB does not have the pinned SHA-256 $SHA256; left in $cache for a look" >&2
    exit 1
fi
tmp=$(mktemp -d "$tools/extract.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$cache/$DEB" "$tmp"
if ! [ -x "$tmp/usr/bin/etcd" ]; then
    echo "fetch-etcd: $DEB holds no usr/bin/etcd" >&2
    exit 1
fi
# Temp file and rename: a test that runs meanwhile never sees half a binary.
cp "$tmp/usr/bin/etcd" "$tools/etcd.new"
sync "$tools/etcd.new" 2>/dev/null || true
mv -f "$tools/etcd.new" "$bin"
echo "$SHA256" >"$stamp.new" && mv -f "$stamp.new" "$stamp"
echo "$bin"
