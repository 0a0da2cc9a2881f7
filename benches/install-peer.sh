#!/usr/bin/env bash
# benches/install-peer.sh: the one place the benchmarks get their QEMU peer
# (qemu-system-x86_64 and qemu-img) from. benches/qemu_peer.py (used by
# checkpoint.py and snapshot.py) and benches/linux_boot_peer.sh call it;
# nothing else in benches/ installs QEMU.
#
# Why a script: qemu-system-x86_64 and qemu-img must come from one QEMU
# version. Some machines here carry qemu-utils 1:10.0 from bookworm-backports,
# whose `Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)` rules out Debian 12's
# qemu-system-x86 7.2. Then a plain `apt-get install qemu-system-x86`
#   - fails with "you have held broken packages" when bookworm-backports is in
#     the sources (apt cannot downgrade qemu-utils by itself), or
#   - when it is not, removes qemu-utils (and with it qemu-img) to make room,
# and the QEMU columns of the benchmarks vanish. This script installs a
# matching pair instead, every QEMU package at the same version V, downgrading
# qemu-utils if need be:
#
#   apt-get install -y --no-install-recommends --allow-downgrades \
#       qemu-system-x86=V qemu-system-common=V qemu-system-data=V' qemu-utils=V
#
# V is apt's candidate for qemu-system-x86: 1:7.2+dfsg-7+deb12u18+b3 (QEMU
# 7.2.22) on Debian 12 with the default pins, the version the tables in
# docs/benchmarks/ were measured with (see /work/shared/design/HOST-KVM.md).
# V' is V without its binNMU suffix (+bN): qemu-system-data is arch:all and
# not rebuilt. Any other installed package built from the qemu source
# (qemu-block-extra, ...) is moved to V as well.
#
# Usage: benches/install-peer.sh [--check]
#   (none)    make sure a matching pair is installed; install one (root) if not
#   --check   install nothing; only say whether a matching pair is there
# Environment:
#   QEMU_PEER_VERSION=V   install this Debian version instead of the candidate
#                         (e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1 for the backports pair)
#
# Idempotent: with a matching pair installed it changes nothing (no apt-get
# update, no install). It runs `apt-get update` only when apt knows no
# qemu-system-x86 (a fresh machine), or once more after a failed install.
#
# Output: progress lines "install-peer: ..." on stdout, then one last line:
#   stdout "QEMU peer ready: qemu-system-x86_64 <version>, qemu-img <version>", exit 0
#   stderr "QEMU peer missing: <reason>", exit 1
# apt's own output goes to stderr, only when it fails.
set -uo pipefail

CHECK_ONLY=
case "${1:-}" in
"") ;;
--check) CHECK_ONLY=1 ;;
-h | --help)
	sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
	;;
*)
	echo "usage: $0 [--check]" >&2
	exit 2
	;;
esac

say() { echo "install-peer: $*"; }
missing() {
	echo "QEMU peer missing: $*" >&2
	exit 1
}

# "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)" from `BINARY --version`, or "".
version_of() {
	command -v "$1" >/dev/null 2>&1 || return 0
	"$1" --version 2>/dev/null | head -n 1 | sed -n 's/^.*[Vv]ersion //p'
}

QEMU_V='' IMG_V='' PROBLEM=''
# Succeeds when both binaries are there and of one upstream version; sets
# PROBLEM to what is wrong otherwise.
have_pair() {
	hash -r
	QEMU_V=$(version_of qemu-system-x86_64)
	IMG_V=$(version_of qemu-img)
	if [ -z "$QEMU_V" ] && [ -z "$IMG_V" ]; then
		PROBLEM="neither qemu-system-x86_64 nor qemu-img is installed"
	elif [ -z "$QEMU_V" ]; then
		PROBLEM="qemu-system-x86_64 is not installed (qemu-img $IMG_V is)"
	elif [ -z "$IMG_V" ]; then
		PROBLEM="qemu-img is not installed (qemu-system-x86_64 $QEMU_V is)"
	elif [ "${QEMU_V%% *}" != "${IMG_V%% *}" ]; then
		PROBLEM="qemu-system-x86_64 $QEMU_V and qemu-img $IMG_V are not one QEMU version"
	else
		PROBLEM=
		return 0
	fi
	return 1
}

ready() {
	echo "QEMU peer ready: qemu-system-x86_64 $QEMU_V, qemu-img $IMG_V"
	exit 0
}

if have_pair; then
	say "matching pair already installed; nothing to do"
	ready
fi
[ -z "$CHECK_ONLY" ] || missing "$PROBLEM (run benches/install-peer.sh as root to install a matching pair)"
command -v apt-get >/dev/null 2>&1 ||
	missing "$PROBLEM, and this machine has no apt-get: install qemu-system-x86_64 and qemu-img of one QEMU version by hand"
[ "$(id -u)" -eq 0 ] ||
	missing "$PROBLEM; installing a matching pair needs root: run benches/install-peer.sh as root"

export DEBIAN_FRONTEND=noninteractive
APT_LOG=$(mktemp)
trap 'rm -f "$APT_LOG"' EXIT
UPDATED=

apt_update() {
	say "apt-get update"
	apt-get -q -o DPkg::Lock::Timeout=300 update >>"$APT_LOG" 2>&1 || {
		cat "$APT_LOG" >&2
		missing "$PROBLEM, and apt-get update failed: $(grep -m1 '^E:' "$APT_LOG" || tail -n 1 "$APT_LOG")"
	}
	UPDATED=1
}

# The versions of package $1 that apt can install, one per line.
versions() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }'; }
available() { versions "$1" | grep -qxF -- "$2"; }
installed_version() { dpkg-query -W -f '${db:Status-Abbrev}${Version}' "$1" 2>/dev/null | sed -n 's/^ii *//p'; }
candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$'; }

[ -n "$(candidate qemu-system-x86)" ] || apt_update

# The version V of the pair.
V=${QEMU_PEER_VERSION:-}
if [ -z "$V" ]; then
	# qemu-system-x86 already there: complete it with its own qemu-utils.
	V=$(installed_version qemu-system-x86)
	if [ -z "$V" ] || ! available qemu-utils "$V"; then
		V=$(candidate qemu-system-x86)
	fi
fi
[ -n "$V" ] || missing "$PROBLEM, and apt knows no qemu-system-x86 package (see /etc/apt/sources.list*)"
for p in qemu-system-x86 qemu-system-common qemu-utils; do
	available "$p" "$V" || {
		[ -n "$UPDATED" ] || apt_update
		available "$p" "$V" ||
			missing "$PROBLEM, and apt has no $p $V to make a matching pair (versions: $(versions "$p" | paste -sd, -))"
	}
done

# Every package to install or move, pinned: the three above, qemu-system-data
# (arch:all, V without +bN), and any other installed package of source qemu.
if [[ $V =~ ^(.*)\+b[0-9]+$ ]]; then V_SRC=${BASH_REMATCH[1]}; else V_SRC=$V; fi
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
while read -r status pkg src; do
	if [ "$status" != ii ] || [ "$src" != qemu ]; then continue; fi
	case " ${PKGS[*]} " in *" $pkg "*) continue ;; esac
	PKGS+=("$pkg")
done < <(dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${source:Package}\n' 2>/dev/null)
# A pair from backports also needs its dependencies from there (e.g. seabios
# > 1.16.3 for QEMU 10.0): target that release.
# The suite ("bookworm-backports") that offers version $2 of package $1.
suite_of() {
	apt-cache policy "$1" 2>/dev/null | awk -v v="$2" '
		/^     [^ ]/ || /^ \*\*\* / { sub(/^ *(\*\*\* )?/, ""); here = ($1 == v); next }
		here && NF >= 4 { split($3, s, "/"); print s[1]; exit }'
}
ARGS=()
SUITE=$(suite_of qemu-system-x86 "$V")
case "$SUITE" in *-backports) ARGS+=(-t "$SUITE") ;; esac
for p in "${PKGS[@]}"; do
	if available "$p" "$V"; then
		ARGS+=("$p=$V")
	elif available "$p" "$V_SRC"; then
		ARGS+=("$p=$V_SRC")
	else
		ARGS+=("$p") # let apt choose; it must still satisfy the pinned ones
	fi
done

BEFORE=$(dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\n' "${PKGS[@]}" 2>/dev/null | sed -n 's/^ii *//p' | paste -sd, - | sed 's/,/, /g')
say "$PROBLEM"
say "installed before: ${BEFORE:-none of ${PKGS[*]}}"
install() {
	say "apt-get install -y --no-install-recommends --allow-downgrades ${ARGS[*]}"
	: >"$APT_LOG"
	apt-get -q -y -o DPkg::Lock::Timeout=300 --no-install-recommends --allow-downgrades \
		install "${ARGS[@]}" >>"$APT_LOG" 2>&1
}
if ! install; then
	if [ -z "$UPDATED" ]; then
		# Stale package lists (a 404) are the usual cause on a fresh machine.
		apt_update
		install
	else
		false
	fi
fi || {
	cat "$APT_LOG" >&2
	missing "apt-get install ${ARGS[*]} failed: $(grep '^E:' "$APT_LOG" | tail -n 1 || true)"
}
AFTER=$(dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\n' "${PKGS[@]}" 2>/dev/null | sed -n 's/^ii *//p' | paste -sd, - | sed 's/,/, /g')
say "installed now: $AFTER"
have_pair || missing "$PROBLEM, even after apt-get install ${ARGS[*]}"
ready
