#!/usr/bin/env bash
# Build the specvm Linux guest image from Debian 12 (bookworm) packages only,
# at the exact versions and SHA-256s pinned in images/packages.lock.
#
# Outputs, in images/out/:
#   bzImage          the kernel exactly as Debian ships it
#   vmlinux          the uncompressed ELF kernel, taken out of the bzImage on
#                    the host (the guest need not decompress itself)
#   initramfs.cpio   uncompressed newc archive: static busybox, /init, the
#                    virtio modules, and /bin/spec if a guest agent is given
#   config           the kernel's build configuration
#   manifest.txt     Debian package versions, kernel facts, output hashes
#   stamp            hash of every input; a matching stamp means up to date
#   disk.ext4        a 64 MiB ext4 data disk (/hello, an empty /data), made
#                    reproducibly by the pinned mke2fs -d
#   tools/           the pinned e2fsprogs: tools/e2fsck, tools/debugfs,
#                    tools/dumpe2fs, tools/mke2fs (wrappers; see docs)
#   disk.stamp       like stamp, for disk.ext4 and tools/ (own inputs: the
#                    disk is rebuilt only when they change, or if it was
#                    written to since it was built)
#
# Usage: images/build.sh [--force] [--update]
#   --force    rebuild even if the stamp matches
#   --update   apt-get update, pin the versions apt offers now in the lock
#              (the kernel through linux-image-cloud-amd64), then build
#
# Environment:
#   SPECVM_GUEST_AGENT=PATH     copy PATH to /bin/spec in the initramfs
#                               (default: images/extra/bin/spec, if present;
#                               else the project's own `spec`, built static
#                               from guest-agent/ when cargo is available)
#   SPECVM_KERNEL_VERSION=VER   with --update: the version of
#                               linux-image-cloud-amd64 to pin (default:
#                               apt's candidate); without it: must match the
#                               lock's
#   SPECVM_GUEST_MODULES="..."  modules to load in the guest, by name; their
#                               dependencies are added automatically
#   SPECVM_IMAGES_LOCK=FILE     the lock file (default: images/packages.lock)
#   SPECVM_IMAGES_CACHE=DIR     downloaded .debs and scratch space
#                               (default: images/cache)
#   SPECVM_IMAGES_OUT=DIR       where the outputs go (default: images/out)
#
# See docs/images.md.
set -euo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=$IMAGES_DIR/$(basename "${BASH_SOURCE[0]}")
INIT_SRC=$IMAGES_DIR/init
REPO=$(cd "$IMAGES_DIR/.." && pwd)

# An absolute path for $1 (apt-get download runs in another directory).
abspath() {
	case $1 in
	/*) printf '%s\n' "$1" ;;
	*) printf '%s/%s\n' "$PWD" "$1" ;;
	esac
}
LOCK=$(abspath "${SPECVM_IMAGES_LOCK:-$IMAGES_DIR/packages.lock}")
CACHE_DIR=$(abspath "${SPECVM_IMAGES_CACHE:-$IMAGES_DIR/cache}")
OUT_DIR=$(abspath "${SPECVM_IMAGES_OUT:-$IMAGES_DIR/out}")
# The lock as messages name it: relative to the checkout when inside it.
LOCK_NAME=${LOCK#"$REPO"/}

KERNEL_META=linux-image-cloud-amd64
DEFAULT_MODULES="virtio virtio_ring virtio_mmio failover net_failover virtio_net virtio_blk"
MODULES=${SPECVM_GUEST_MODULES:-$DEFAULT_MODULES}
# Fixed timestamp for the files in the initramfs, so the archive is
# byte-for-byte reproducible.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}

# The pinned packages, by role. In fetch order: the small ones first, so a
# bad lock fails before the 27 MB kernel download.
ROLES=(lz4 cpio e2fs ext2fs comerr ss busybox kernel)
# Those the kernel, vmlinux and initramfs are made from, and those of the
# disk image: e2fsprogs (mke2fs, e2fsck, debugfs) and the libraries of its
# source package they link (libext2fs and libe2p do the writing; libcom_err
# and libss are there so that no e2fsprogs need be installed on the host).
IMAGE_ROLES=(lz4 cpio busybox kernel)
DISK_ROLES=(e2fs ext2fs comerr ss)
# The package of each role; the kernel's is whatever linux-image-cloud-amd64
# depends on (linux-image-6.1.0-N-cloud-amd64).
declare -A ROLE_PKG=([lz4]=lz4 [cpio]=cpio [busybox]=busybox-static
	[e2fs]=e2fsprogs [ext2fs]=libext2fs2 [comerr]=libcom-err2 [ss]=libss2)

# The disk image. Its bytes depend only on these, the pinned e2fsprogs and
# SOURCE_DATE_EPOCH: fixed UUID and directory hash seed, every timestamp at
# DISK_TIME, owner 0:0. DISK_TIME is SOURCE_DATE_EPOCH, but at least 1:
# e2fsprogs 1.47.0 takes E2FSPROGS_FAKE_TIME=0 for "unset" and uses the clock.
DISK_SIZE=64M
DISK_LABEL=specvm-disk
DISK_UUID=5ec7d15c-0000-4000-8000-000000000001
DISK_HASH_SEED=5ec7d15c-0000-4000-8000-000000000002
DISK_HELLO="hello from the specvm disk image"
# The programs of e2fsprogs that get a wrapper in out/tools.
DISK_TOOLS=(mke2fs e2fsck debugfs dumpe2fs)

FORCE=0
UPDATE=0
for arg in "$@"; do
	case $arg in
	--force) FORCE=1 ;;
	--update) UPDATE=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SCRIPT"
		exit 0
		;;
	*)
		echo "images: unknown argument '$arg' (try --help)" >&2
		exit 2
		;;
	esac
done

log() { printf 'images: %s\n' "$*"; }
warn() { printf 'images: warning: %s\n' "$*" >&2; }
die() {
	printf 'images: error: %s\n' "$*" >&2
	exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }
mib() {
	local t=$((($1 * 10 + 524288) / 1048576))
	echo "$((t / 10)).$((t % 10)) MiB"
}
# quietly CMD...: run CMD with its output in a log file; show the end of the
# log if it fails, and return its status.
quietly() {
	local out=$CACHE_DIR/last-command.log rc=0
	"$@" >"$out" 2>&1 || rc=$?
	[ "$rc" -eq 0 ] || tail -n 20 "$out" | sed 's/^/  | /' >&2
	return "$rc"
}

# Temporary directories, removed on exit however the script ends.
CLEANUP=()
cleanup() {
	[ "${#CLEANUP[@]}" -eq 0 ] || rm -rf "${CLEANUP[@]}"
}
trap cleanup EXIT

# apt options: as root, download without the _apt sandbox user (which cannot
# write into a root-owned cache directory and only produces a warning).
APT_OPTS=()
if is_root; then
	APT_OPTS=(-o APT::Sandbox::User=root)
fi

# ---------------------------------------------------------------------------
# apt (only for downloads and for --update)
# ---------------------------------------------------------------------------

candidate() {
	local v
	v=$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
	if [ -z "$v" ] || [ "$v" = "(none)" ]; then
		return 1
	fi
	printf '%s\n' "$v"
}

# Field $3 of the package record $1=$2 (the first record that has it).
field() {
	apt-cache show "$1=$2" 2>/dev/null | awk -v f="$3" '
		index($0, f ": ") == 1 { print substr($0, length(f) + 3); exit }'
}

# Whether apt can download $1=$2: a record with a Filename (an installed
# package's status record has none).
apt_offers() {
	[ -n "$(field "$1" "$2" Filename)" ]
}

# apt-get update, at most once per run. Returns 1 (with a message) on failure.
APT_UPDATED=0
apt_update() {
	[ "$APT_UPDATED" -eq 0 ] || return 0
	APT_UPDATED=1
	if ! is_root; then
		warn "apt-get update is needed but needs root"
		return 1
	fi
	log "apt-get update"
	if ! quietly apt-get "${APT_OPTS[@]}" -q update; then
		warn "command failed: apt-get update"
		return 1
	fi
}

# --update: sets PKG, VER, SHA and META_VER to what apt offers now.
resolve_from_apt() {
	local role dep
	META_VER=${SPECVM_KERNEL_VERSION:-}
	if [ -z "$META_VER" ]; then
		META_VER=$(candidate "$KERNEL_META") || die "apt has no candidate for $KERNEL_META"
	fi
	dep=$(field "$KERNEL_META" "$META_VER" Depends)
	[ -n "$dep" ] || die "apt knows no $KERNEL_META version $META_VER"
	# Depends: linux-image-6.1.0-48-cloud-amd64 (= 6.1.172-1)
	PKG[kernel]=$(grep -oE 'linux-image-[0-9][^ ,|()]*-cloud-amd64' <<<"$dep" | head -n1) ||
		die "$KERNEL_META $META_VER: no linux-image-*-cloud-amd64 in Depends: $dep"
	VER[kernel]=$(sed -nE "s/.*${PKG[kernel]} \(= ([^)]+)\).*/\1/p" <<<"$dep")
	if [ -z "${VER[kernel]}" ]; then
		VER[kernel]=$(candidate "${PKG[kernel]}") || die "apt has no candidate for ${PKG[kernel]}"
	fi
	for role in "${ROLES[@]}"; do
		[ "$role" != kernel ] || continue
		PKG[$role]=${ROLE_PKG[$role]}
		VER[$role]=$(candidate "${PKG[$role]}") || die "apt has no candidate for ${PKG[$role]}"
	done
	for role in "${ROLES[@]}"; do
		SHA[$role]=$(field "${PKG[$role]}" "${VER[$role]}" SHA256)
		[ -n "${SHA[$role]}" ] || die "apt shows no SHA256 for ${PKG[$role]} ${VER[$role]}"
	done
}

# ---------------------------------------------------------------------------
# The lock file
# ---------------------------------------------------------------------------
# One line per package: ROLE PACKAGE VERSION SHA256, and one line
# "meta linux-image-cloud-amd64 VERSION" (the meta-package the kernel was
# resolved through; it is never downloaded). '#' starts a comment.

declare -A PKG=() VER=() SHA=()
META_VER=

read_lock() {
	[ -f "$LOCK" ] || die "no lock file $LOCK: run images/build.sh --update to create it"
	local n=0 line role pkg ver sha rest where
	PKG=() VER=() SHA=() META_VER=
	while IFS= read -r line || [ -n "$line" ]; do
		n=$((n + 1))
		line=${line%%#*}
		read -r role pkg ver sha rest <<<"$line" || true
		[ -n "$role" ] || continue
		where="$LOCK line $n"
		[ -z "$rest" ] || die "$where: more than 4 fields"
		[[ $pkg =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || die "$where: bad package name '$pkg'"
		[[ $ver =~ ^[0-9A-Za-z.+~:-]+$ ]] || die "$where: bad version '$ver'"
		case $role in
		meta)
			if [ "$pkg" != "$KERNEL_META" ] || [ -n "$sha" ]; then
				die "$where: expected 'meta $KERNEL_META VERSION'"
			fi
			META_VER=$ver
			continue
			;;
		kernel)
			[[ $pkg =~ ^linux-image-[0-9].*-cloud-amd64$ ]] ||
				die "$where: the kernel package must be linux-image-*-cloud-amd64, not '$pkg'"
			;;
		lz4 | cpio | busybox | e2fs | ext2fs | comerr | ss)
			[ "$pkg" = "${ROLE_PKG[$role]}" ] ||
				die "$where: the $role package must be ${ROLE_PKG[$role]}, not '$pkg'"
			;;
		*) die "$where: unknown role '$role' (expected meta, ${ROLES[*]})" ;;
		esac
		[ -z "${PKG[$role]:-}" ] || die "$where: a second '$role' line"
		[[ $sha =~ ^[0-9a-f]{64}$ ]] ||
			die "$where: '$sha' is not a SHA-256 (64 lowercase hex digits)"
		PKG[$role]=$pkg
		VER[$role]=$ver
		SHA[$role]=$sha
	done <"$LOCK"
	for role in "${ROLES[@]}"; do
		[ -n "${PKG[$role]:-}" ] || die "$LOCK: no '$role' line (run images/build.sh --update)"
	done
	[ -n "$META_VER" ] || die "$LOCK: no 'meta' line (run images/build.sh --update)"
	# e2fsprogs depends on exactly its own version of libext2fs2.
	[ "${VER[e2fs]}" = "${VER[ext2fs]}" ] ||
		die "$LOCK: e2fsprogs ${VER[e2fs]} needs libext2fs2 ${VER[e2fs]}, not ${VER[ext2fs]} (run images/build.sh --update)"
}

# Writes PKG, VER, SHA and META_VER to the lock durably: a temporary file in
# the same directory, fsync'd, renamed over the lock, then the directory
# fsync'd, so a crash leaves the old lock or the new one, never half of one.
write_lock() {
	local tmp role
	tmp=$(mktemp "$LOCK.tmp.XXXXXX") || die "cannot create a temporary file next to $LOCK"
	CLEANUP+=("$tmp")
	{
		echo "# The exact Debian packages images/build.sh builds the guest image from."
		echo "# Every .deb is checked against its SHA256 here before it is used."
		echo "# Written by \`images/build.sh --update\`; see docs/images.md."
		echo "#"
		printf '# %-6s %-34s %-24s %s\n' ROLE PACKAGE VERSION SHA256
		printf '%-8s %-34s %s\n' meta "$KERNEL_META" "$META_VER"
		for role in kernel busybox lz4 cpio e2fs ext2fs comerr ss; do
			printf '%-8s %-34s %-24s %s\n' "$role" "${PKG[$role]}" "${VER[$role]}" "${SHA[$role]}"
		done
	} >"$tmp" || die "cannot write $tmp"
	chmod 0644 "$tmp"
	sync "$tmp" || die "command failed: sync $tmp"
	mv -f "$tmp" "$LOCK" || die "command failed: mv $tmp $LOCK"
	sync "$(dirname "$LOCK")" || warn "command failed: sync $(dirname "$LOCK")"
}

# ---------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------

[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"
mkdir -p "$CACHE_DIR" "$OUT_DIR"

# One build at a time per cache directory.
if command -v flock >/dev/null; then
	exec 9>"$CACHE_DIR/.lock"
	flock 9
fi

if command -v dpkg >/dev/null; then
	arch=$(dpkg --print-architecture)
	[ "$arch" = amd64 ] || die "host architecture is $arch; this script needs a Debian amd64 host"
else
	die "dpkg not found: this script needs a Debian (bookworm) amd64 host"
fi
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian package dpkg)"
# Left by the versions of this script that resolved through apt on every run.
rm -f "$CACHE_DIR/resolved"

if [ "$UPDATE" -eq 1 ]; then
	command -v apt-get >/dev/null || die "--update needs apt-get"
	is_root || die "--update runs apt-get update, which needs root"
	apt_update || die "--update: apt-get update failed (see above)"
	declare -A OLD=()
	if [ -f "$LOCK" ] && (read_lock) 2>/dev/null; then
		read_lock
		for role in "${ROLES[@]}"; do
			OLD[$role]="${PKG[$role]} ${VER[$role]}"
		done
	elif [ -f "$LOCK" ]; then
		warn "$LOCK does not parse; replacing it"
	fi
	resolve_from_apt
	for role in "${ROLES[@]}"; do
		if [ "${OLD[$role]:-}" = "${PKG[$role]} ${VER[$role]}" ]; then
			log "lock: $role ${PKG[$role]} ${VER[$role]} (unchanged)"
		else
			log "lock: $role ${PKG[$role]} ${VER[$role]} (was: ${OLD[$role]:-none})"
		fi
	done
	write_lock
	log "wrote $LOCK"
fi

read_lock
if [ -n "${SPECVM_KERNEL_VERSION:-}" ] && [ "$SPECVM_KERNEL_VERSION" != "$META_VER" ]; then
	die "SPECVM_KERNEL_VERSION=$SPECVM_KERNEL_VERSION, but $LOCK_NAME pins $KERNEL_META $META_VER; run SPECVM_KERNEL_VERSION=$SPECVM_KERNEL_VERSION images/build.sh --update to pin it"
fi
KERNEL_PKG=${PKG[kernel]}
KERNEL_VER=${VER[kernel]}
BUSYBOX_PKG=${PKG[busybox]}
BB_VER=${VER[busybox]}

# Optional guest agent.
AGENT=
if [ -n "${SPECVM_GUEST_AGENT:-}" ]; then
	[ -f "$SPECVM_GUEST_AGENT" ] || die "SPECVM_GUEST_AGENT=$SPECVM_GUEST_AGENT: no such file"
	AGENT=$(cd "$(dirname "$SPECVM_GUEST_AGENT")" && pwd)/$(basename "$SPECVM_GUEST_AGENT")
elif [ -f "$IMAGES_DIR/extra/bin/spec" ]; then
	AGENT=$IMAGES_DIR/extra/bin/spec
elif command -v cargo >/dev/null 2>&1; then
	# The guest agent's `spec` command, static so the initramfs needs no C
	# library, without symbols to keep the archive small. The checkout's and
	# cargo's directories are remapped in the paths the binary keeps (panic
	# locations), so every clone builds the same bytes wherever it lies.
	log "building the guest agent (guest-agent/, static)"
	AGENT_TARGET=$REPO/target/guest-agent
	agent_flags=(
		-C target-feature=+crt-static
		-C strip=symbols
		"--remap-path-prefix=$REPO=/specvm"
		"--remap-path-prefix=${CARGO_HOME:-${HOME:-/root}/.cargo}=/cargo"
	)
	# CARGO_ENCODED_RUSTFLAGS (0x1f-separated): the paths may hold spaces.
	CARGO_ENCODED_RUSTFLAGS=$(
		IFS=$'\x1f'
		echo "${agent_flags[*]}"
	)
	env -u RUSTFLAGS CARGO_ENCODED_RUSTFLAGS="$CARGO_ENCODED_RUSTFLAGS" \
		cargo build --quiet --release --manifest-path "$REPO/Cargo.toml" -p guest-agent \
		--features std --bin spec --target x86_64-unknown-linux-gnu --target-dir "$AGENT_TARGET" ||
		die "building the guest agent failed (cargo build -p guest-agent --features std --bin spec)"
	AGENT=$AGENT_TARGET/x86_64-unknown-linux-gnu/release/spec
fi
AGENT_SHA=none
[ -z "$AGENT" ] || AGENT_SHA=$(sha256 "$AGENT")

MODULES=$(tr -s ' \t\n-' '   _' <<<"$MODULES" | sed -E 's/^ +| +$//g')

STAMP=$(
	{
		echo "build.sh $(sha256 "$SCRIPT")"
		echo "init $(sha256 "$INIT_SRC")"
		echo "$KERNEL_META $META_VER"
		for role in "${IMAGE_ROLES[@]}"; do
			echo "$role ${PKG[$role]} ${VER[$role]} ${SHA[$role]}"
		done
		echo "modules $MODULES"
		echo "agent $AGENT_SHA"
		echo "epoch $SOURCE_DATE_EPOCH"
	} | sha256sum | cut -d' ' -f1
)
# The disk's own stamp: not the kernel, init, modules or agent, so changing
# those leaves disk.ext4 alone (the disk's recipe is in build.sh).
DISK_TIME=$((SOURCE_DATE_EPOCH > 0 ? SOURCE_DATE_EPOCH : 1))
DISK_STAMP=$(
	{
		echo "build.sh $(sha256 "$SCRIPT")"
		for role in "${DISK_ROLES[@]}"; do
			echo "$role ${PKG[$role]} ${VER[$role]} ${SHA[$role]}"
		done
		echo "disk-time $DISK_TIME"
	} | sha256sum | cut -d' ' -f1
)

OUTPUTS=(bzImage vmlinux initramfs.cpio config manifest.txt)
up_to_date() {
	[ "$FORCE" -eq 0 ] || return 1
	[ -f "$OUT_DIR/stamp" ] && [ "$(cat "$OUT_DIR/stamp")" = "$STAMP" ] || return 1
	local f
	for f in "${OUTPUTS[@]}"; do
		[ -s "$OUT_DIR/$f" ] || return 1
	done
}
# disk.stamp is DISK_STAMP and the size and mtime disk.ext4 had when it was
# built: a guest that mounted the disk read-write changed it, and it is made
# again (a stat, where hashing 64 MiB would cost more than the whole check).
disk_state() { stat -c '%s %y' "$OUT_DIR/disk.ext4"; }
DISK_CHANGED=0
disk_up_to_date() {
	[ "$FORCE" -eq 0 ] || return 1
	[ -f "$OUT_DIR/disk.stamp" ] && [ -s "$OUT_DIR/disk.ext4" ] || return 1
	local want t
	want=$(head -n1 "$OUT_DIR/disk.stamp")
	[ "$want" = "$DISK_STAMP" ] || return 1
	for t in "${DISK_TOOLS[@]}"; do
		[ -x "$OUT_DIR/tools/$t" ] || return 1
	done
	if [ "$(sed -n 2p "$OUT_DIR/disk.stamp")" != "$(disk_state)" ]; then
		DISK_CHANGED=1
		return 1
	fi
}
BUILD_IMAGE=1
BUILD_DISK=1
! up_to_date || BUILD_IMAGE=0
! disk_up_to_date || BUILD_DISK=0
if [ "$BUILD_IMAGE" -eq 0 ] && [ "$BUILD_DISK" -eq 0 ]; then
	log "up to date ($OUT_DIR)"
	exit 0
fi
[ "$DISK_CHANGED" -eq 0 ] || log "disk.ext4 was written to since it was built (by a guest?): making it again"

NEED_ROLES=()
for role in "${ROLES[@]}"; do
	case " ${IMAGE_ROLES[*]} " in
	*" $role "*) [ "$BUILD_IMAGE" -eq 1 ] && NEED_ROLES+=("$role") ;;
	*) [ "$BUILD_DISK" -eq 1 ] && NEED_ROLES+=("$role") ;;
	esac
done
if [ "$BUILD_IMAGE" -eq 1 ]; then
	log "building: $KERNEL_PKG $KERNEL_VER (via $KERNEL_META $META_VER), $BUSYBOX_PKG $BB_VER, lz4 ${VER[lz4]}, cpio ${VER[cpio]}${AGENT:+, agent $AGENT}"
else
	log "kernel and initramfs up to date"
fi
if [ "$BUILD_DISK" -eq 1 ]; then
	log "building: disk.ext4 with ${PKG[e2fs]} ${VER[e2fs]}"
else
	log "disk.ext4 up to date"
fi

# need_tool COMMAND PACKAGE: install PACKAGE with apt-get if COMMAND is missing.
# Only for tools that do not shape the image's bytes (od, dd) or that this
# kernel never needs (module decompressors); lz4 and cpio are pinned below.
need_tool() {
	command -v "$1" >/dev/null && return 0
	is_root || die "'$1' is missing; install Debian package '$2' (or run this script as root)"
	log "installing host package $2 (for '$1')"
	if ! quietly env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" -q -y \
		--no-install-recommends install "$2"; then
		apt_update || die "command failed: apt-get install $2 (needed for '$1')"
		quietly env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" -q -y \
			--no-install-recommends install "$2" ||
			die "command failed: apt-get install $2 (needed for '$1')"
	fi
	command -v "$1" >/dev/null || die "package $2 installed but '$1' still not found"
}

need_tool od coreutils
need_tool dd coreutils

# ---------------------------------------------------------------------------
# Downloads: exactly the locked versions, checked against the lock's SHA256
# ---------------------------------------------------------------------------

# apt-get download's file name: NAME_VERSION_ARCH.deb, ':' (epoch) as %3a.
deb_path() { printf '%s/%s_%s_amd64.deb\n' "$CACHE_DIR" "$1" "${2//:/%3a}"; }

# cannot_fetch PKG VER WHY: the pinned version is gone; say what to do.
cannot_fetch() {
	die "$1 $2 cannot be fetched: $3; $LOCK_NAME pins that version and no other is taken: run images/build.sh --update to move the lock to the versions apt offers now"
}

# download PKG VER: apt-get download PKG=VER into a fresh directory under the
# cache; sets DL_FILE. Runs apt-get update once if apt does not offer that
# version (no package lists yet, or lists older than the lock).
download() {
	local pkg=$1 ver=$2 dir
	command -v apt-get >/dev/null ||
		die "$pkg $ver is not in $CACHE_DIR and apt-get is not here to download it"
	if ! apt_offers "$pkg" "$ver"; then
		log "apt offers no $pkg $ver; updating its package lists"
		apt_update || true
		apt_offers "$pkg" "$ver" || cannot_fetch "$pkg" "$ver" "apt offers no such version (after apt-get update)"
	fi
	dir=$(mktemp -d "$CACHE_DIR/download.XXXXXX")
	CLEANUP+=("$dir")
	log "downloading $pkg $ver"
	(cd "$dir" && quietly apt-get "${APT_OPTS[@]}" -q download "$pkg=$ver") ||
		cannot_fetch "$pkg" "$ver" "apt-get download $pkg=$ver failed (its output is above)"
	DL_FILE=$dir/$(basename "$(deb_path "$pkg" "$ver")")
	[ -f "$DL_FILE" ] || die "apt-get download $pkg=$ver did not produce $(basename "$DL_FILE")"
}

# fetch ROLE: the locked .deb of ROLE, in the cache, with the locked SHA256.
# A file that does not match is never extracted nor kept.
fetch() {
	local role=$1 pkg=${PKG[$1]} ver=${VER[$1]} want=${SHA[$1]} deb got old
	deb=$(deb_path "$pkg" "$ver")
	if [ -f "$deb" ]; then
		got=$(sha256 "$deb")
		if [ "$got" = "$want" ]; then
			log "cached $pkg $ver"
			return 0
		fi
		warn "cached $(basename "$deb") has sha256 $got, the lock says $want: downloading it again"
		rm -f "$deb"
	fi
	download "$pkg" "$ver"
	got=$(sha256 "$DL_FILE")
	if [ "$got" != "$want" ]; then
		rm -f "$DL_FILE"
		die "$pkg $ver: wrong sha256, refused: expected $want ($LOCK_NAME), got $got"
	fi
	mv -f "$DL_FILE" "$deb"
	# Drop other versions of the same package.
	for old in "$CACHE_DIR/${pkg}_"*.deb; do
		[ "$old" = "$deb" ] || rm -f "$old"
	done
}

declare -A DEB=()
for role in "${NEED_ROLES[@]}"; do
	fetch "$role"
	DEB[$role]=$(deb_path "${PKG[$role]}" "${VER[$role]}")
done

WORK=$(mktemp -d "$CACHE_DIR/work.XXXXXX")
CLEANUP+=("$WORK")

# ---------------------------------------------------------------------------
# disk.ext4, and the pinned e2fsprogs in out/tools
# ---------------------------------------------------------------------------
# mke2fs -d copies a staging folder into the new file system: no loop
# device, no mount, no root needed. mke2fs is Debian's, run from its .deb
# with its own libext2fs (which does the writing) and its own mke2fs.conf
# (the default features), never the host's. What mke2fs takes from the
# clock or the host is fixed: the UUID (-U), the directory hash seed, the
# owner of / (root_owner), the file system's times (E2FSPROGS_FAKE_TIME) and
# the files' atime and mtime (touch). A copied file's ctime is the staging
# file's real one, which touch cannot set, and its owner the staging file's
# (the user running this): debugfs sets both afterwards.

if [ "$BUILD_DISK" -eq 1 ]; then
	DSTAGE=$WORK/disk-out
	E2FS=$DSTAGE/tools/e2fsprogs
	log "extracting ${PKG[e2fs]} ${VER[e2fs]} (and libext2fs2, libcom-err2, libss2) into tools/"
	mkdir -p "$E2FS"
	for role in "${DISK_ROLES[@]}"; do
		dpkg-deb -x "${DEB[$role]}" "$E2FS" || die "command failed: dpkg-deb -x ${DEB[$role]}"
	done
	# Documentation, man pages, systemd units and e2scrub's cron job: unused.
	rm -rf "${E2FS:?}/usr/share" "$E2FS/lib/systemd" "$E2FS/lib/udev" "$E2FS/etc/cron.d"
	for t in "${DISK_TOOLS[@]}"; do
		[ -x "$E2FS/sbin/$t" ] || die "${PKG[e2fs]} ${VER[e2fs]}: no sbin/$t"
		# A wrapper that runs the pinned binary with the pinned libraries
		# and configuration wherever out/ lies (libblkid, libuuid and libc,
		# as for lz4 and cpio, are the host's).
		cat >"$DSTAGE/tools/$t" <<-EOF
			#!/bin/sh
			# Written by images/build.sh: $t of ${PKG[e2fs]} ${VER[e2fs]}, pinned in images/packages.lock.
			d=\$(CDPATH= cd -- "\$(dirname -- "\$0")" && pwd)/e2fsprogs
			LD_LIBRARY_PATH=\$d/lib/x86_64-linux-gnu
			MKE2FS_CONFIG=\$d/etc/mke2fs.conf
			E2FSCK_CONFIG=/dev/null
			export LD_LIBRARY_PATH MKE2FS_CONFIG E2FSCK_CONFIG
			exec "\$d/sbin/$t" "\$@"
		EOF
		chmod 0755 "$DSTAGE/tools/$t"
	done
	"$DSTAGE/tools/mke2fs" -V >/dev/null 2>&1 ||
		die "the pinned mke2fs ($DSTAGE/tools/mke2fs) does not run on this host"

	log "making disk.ext4 ($DISK_SIZE): /hello, /data"
	DROOT=$WORK/disk-root
	mkdir -p "$DROOT/data"
	printf '%s\n' "$DISK_HELLO" >"$DROOT/hello"
	chmod 0755 "$DROOT" "$DROOT/data"
	chmod 0644 "$DROOT/hello"
	find "$DROOT" -exec touch -h -d "@$DISK_TIME" {} +
	quietly env E2FSPROGS_FAKE_TIME="$DISK_TIME" "$DSTAGE/tools/mke2fs" -q -F -t ext4 -b 4096 \
		-L "$DISK_LABEL" -U "$DISK_UUID" -E "hash_seed=$DISK_HASH_SEED,root_owner=0:0" \
		-d "$DROOT" "$DSTAGE/disk.ext4" "$DISK_SIZE" || die "command failed: mke2fs -d (disk.ext4)"
	(cd "$DROOT" && find . -printf '%P\0' | LC_ALL=C sort -z) |
		while IFS= read -r -d '' f; do
			echo "set_inode_field /$f ctime @$DISK_TIME"
			echo "set_inode_field /$f uid 0"
			echo "set_inode_field /$f gid 0"
		done >"$WORK/disk-fix.debugfs"
	quietly "$DSTAGE/tools/debugfs" -w -f "$WORK/disk-fix.debugfs" "$DSTAGE/disk.ext4" ||
		die "command failed: debugfs -w (ctime and owner of the files in disk.ext4)"
	quietly "$DSTAGE/tools/e2fsck" -fn "$DSTAGE/disk.ext4" ||
		die "e2fsck -fn finds disk.ext4 not clean (output above)"
	log "disk.ext4: $(mib "$(stat -c %s "$DSTAGE/disk.ext4")"), sha256 $(sha256 "$DSTAGE/disk.ext4")"

	rm -f "$OUT_DIR/disk.stamp"
	rm -rf "$OUT_DIR/tools"
	mv -f "$DSTAGE/tools" "$OUT_DIR/tools"
	mv -f "$DSTAGE/disk.ext4" "$OUT_DIR/disk.ext4"
	printf '%s\n%s\n' "$DISK_STAMP" "$(disk_state)" >"$OUT_DIR/disk.stamp"
fi
if [ "$BUILD_IMAGE" -eq 0 ]; then
	log "done: $OUT_DIR ($(cd "$OUT_DIR" && du -sh . | cut -f1))"
	exit 0
fi

# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

KERNEL_DEB=${DEB[kernel]}
BB_DEB=${DEB[busybox]}
STAGE=$WORK/out
ROOT=$WORK/rootfs
mkdir -p "$STAGE" "$ROOT"

# The host tools that shape the image's bytes run from their pinned .debs,
# not from the host: lz4 (vmlinux) and cpio (initramfs.cpio). Both need only
# libc.so.6 (readelf -d: Debian's lz4 binary carries its own LZ4 code despite
# its Depends on liblz4-1), so the host's glibc is the one thing they take
# from the host; bookworm's binaries need glibc >= 2.34. dpkg-deb, which
# unpacks everything, is the host's (it is what installs packages at all).
log "extracting lz4 and cpio"
for role in lz4 cpio; do
	dpkg-deb -x "${DEB[$role]}" "$WORK/tools" || die "command failed: dpkg-deb -x ${DEB[$role]}"
done
LZ4=$WORK/tools/usr/bin/lz4
CPIO=$WORK/tools/bin/cpio
[ -x "$LZ4" ] || die "${PKG[lz4]} ${VER[lz4]}: no usr/bin/lz4"
[ -x "$CPIO" ] || die "${PKG[cpio]} ${VER[cpio]}: no bin/cpio"
"$LZ4" --version >/dev/null 2>&1 || die "the pinned lz4 ($LZ4) does not run on this host"
"$CPIO" --version >/dev/null 2>&1 || die "the pinned cpio ($CPIO) does not run on this host"

log "extracting $KERNEL_PKG"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel" || die "command failed: dpkg-deb -x $KERNEL_DEB"
log "extracting $BUSYBOX_PKG"
dpkg-deb -x "$BB_DEB" "$WORK/busybox" || die "command failed: dpkg-deb -x $BB_DEB"

kvers=("$WORK"/kernel/lib/modules/*/)
if [ "${#kvers[@]}" -ne 1 ] || [ ! -d "${kvers[0]}" ]; then
	die "$KERNEL_PKG: expected one lib/modules/<version>, found: ${kvers[*]}"
fi
KVER=$(basename "${kvers[0]}")
MODDIR=$WORK/kernel/lib/modules/$KVER
BZIMAGE=$WORK/kernel/boot/vmlinuz-$KVER
[ -f "$BZIMAGE" ] || die "$KERNEL_PKG: no boot/vmlinuz-$KVER"
BUSYBOX=$WORK/busybox/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX_PKG: no bin/busybox"

cp "$BZIMAGE" "$STAGE/bzImage"
cp "$WORK/kernel/boot/config-$KVER" "$STAGE/config"

# ---------------------------------------------------------------------------
# vmlinux: the ELF inside the bzImage
# ---------------------------------------------------------------------------
# x86 boot protocol (Documentation/x86/boot.rst): setup_sects at 0x1f1, "HdrS"
# at 0x202, version at 0x206, payload_offset at 0x248 and payload_length at
# 0x24c (protocol >= 2.08), both relative to the protected-mode code, which
# starts at (setup_sects + 1) * 512. The payload is the compressed vmlinux
# (an ELF, plus the relocation table for KASLR) followed by its uncompressed
# size as a little-endian u32.

u8() { od -An -v -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u16() { od -An -v -t u2 -j "$2" -N 2 "$1" | tr -d ' '; }
u32() { od -An -v -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
u64x() { od -An -v -t x8 -j "$2" -N 8 "$1" | tr -d ' '; }
hex() { od -An -v -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

[ "$(hex "$BZIMAGE" $((0x202)) 4)" = 48647253 ] || die "$BZIMAGE: no HdrS boot header"
proto=$(u16 "$BZIMAGE" $((0x206)))
[ "$proto" -ge $((0x208)) ] || die "$BZIMAGE: boot protocol $(printf '%#x' "$proto") < 2.08, no payload fields"
setup_sects=$(u8 "$BZIMAGE" $((0x1f1)))
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_off=$(($((setup_sects + 1)) * 512 + $(u32 "$BZIMAGE" $((0x248)))))
payload_len=$(u32 "$BZIMAGE" $((0x24c)))
magic=$(hex "$BZIMAGE" "$payload_off" 4)
[ "$magic" = 02214c18 ] ||
	die "$BZIMAGE: payload at $payload_off starts with $magic, not the LZ4 legacy magic 02214c18 (unsupported compression)"
vmlinux_size=$(u32 "$BZIMAGE" $((payload_off + payload_len - 4)))

log "extracting vmlinux ($(mib "$vmlinux_size")) from LZ4 payload at offset $payload_off ($(mib "$payload_len"))"
# The size trailer is not LZ4 data: leave it out, or lz4 reports an error.
dd if="$BZIMAGE" iflag=skip_bytes,count_bytes skip="$payload_off" \
	count=$((payload_len - 4)) bs=1M status=none |
	"$LZ4" -dc >"$STAGE/vmlinux" || die "command failed: lz4 -dc (vmlinux payload of $BZIMAGE)"
got_size=$(stat -c %s "$STAGE/vmlinux")
[ "$got_size" -eq "$vmlinux_size" ] ||
	die "vmlinux is $got_size bytes, the bzImage says $vmlinux_size"
# ELF magic, ELFCLASS64, little endian, EM_X86_64 (0x3e).
[ "$(hex "$STAGE/vmlinux" 0 6)" = 7f454c460201 ] || die "vmlinux: not a 64-bit little-endian ELF"
[ "$(u16 "$STAGE/vmlinux" 18)" -eq 62 ] || die "vmlinux: ELF machine is not x86-64"
ENTRY=0x$(u64x "$STAGE/vmlinux" 24)
ENTRY=$(printf '%#x' "$ENTRY")

# PVH entry: the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18 = 0x12).
PVH_ENTRY=unknown
if command -v readelf >/dev/null; then
	PVH_ENTRY=$(readelf -n "$STAGE/vmlinux" | awk '
		/^ *Xen / && /\(0x00000012\)/ { want = 1; next }
		want && /description data:/ {
			sub(/.*description data: */, "")
			v = ""; for (i = NF; i >= 1; i--) v = v $i
			print v; exit }')
	[ -n "$PVH_ENTRY" ] || die "vmlinux: no PVH entry note (Xen note type 0x12)"
	PVH_ENTRY=$(printf '%#x' "0x$PVH_ENTRY")
else
	warn "readelf not found (Debian package binutils): PVH entry note not checked"
fi
log "vmlinux: ELF x86-64, entry $ENTRY, PVH entry $PVH_ENTRY"

# ---------------------------------------------------------------------------
# Kernel modules
# ---------------------------------------------------------------------------
# Debian's package has no modules.dep (its postinst runs depmod on the
# installed system), so make one here with the extracted busybox's depmod.

"$BUSYBOX" depmod -b "$WORK/kernel" "$KVER" || die "command failed: busybox depmod -b ... $KVER"
[ -f "$MODDIR/modules.dep" ] || die "busybox depmod wrote no modules.dep"

# Module name of a .ko path, in MODNAME (no subshell: called thousands of times).
modname() {
	MODNAME=${1##*/}
	MODNAME=${MODNAME%%.ko*}
	MODNAME=${MODNAME//-/_}
}

declare -A MOD_PATH=() MOD_DEPS=() BUILTIN=() STATE=()
while IFS= read -r line; do
	path=${line%%:*}
	modname "$path"
	name=$MODNAME
	MOD_PATH[$name]=$path
	deps=
	for d in ${line#*:}; do
		modname "$d"
		deps+=" $MODNAME"
	done
	MOD_DEPS[$name]=$deps
done <"$MODDIR/modules.dep"
if [ -f "$MODDIR/modules.builtin" ]; then
	while IFS= read -r line; do
		modname "$line"
		BUILTIN[$MODNAME]=1
	done <"$MODDIR/modules.builtin"
fi

ORDER=()
visit() {
	local m=$1 d
	case ${STATE[$m]:-} in
	loaded) return 0 ;;
	visiting) die "module dependency cycle through $m" ;;
	esac
	if [ -n "${BUILTIN[$m]:-}" ]; then
		log "module $m is built into the kernel"
		STATE[$m]=loaded
		return 0
	fi
	[ -n "${MOD_PATH[$m]:-}" ] || die "module $m: not in $KERNEL_PKG (neither loadable nor built in)"
	STATE[$m]=visiting
	for d in ${MOD_DEPS[$m]}; do
		visit "$d"
	done
	STATE[$m]=loaded
	ORDER+=("$m")
}
for m in $MODULES; do
	visit "$m"
done

# ---------------------------------------------------------------------------
# initramfs tree
# ---------------------------------------------------------------------------

log "assembling initramfs: busybox, ${#ORDER[@]} modules, /init${AGENT:+, /bin/spec}"
mkdir -p "$ROOT"/{bin,dev,etc,lib/modules,mnt,proc,root,run,sys,tmp,usr}
chmod 0700 "$ROOT/root"
chmod 1777 "$ROOT/tmp"
ln -s bin "$ROOT/sbin"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"

install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
applets=0
# No modprobe: /init loads the modules with insmod, and this image has no
# modules.dep for modprobe to read. Without /sbin/modprobe the kernel's own
# module requests (crypto, protocol families) fail at once instead of
# starting a process that cannot help; such kernel-started helpers also miss
# init's environment, with the glibc tunable of specvm's host-compat layer
# (vmm/src/host_compat/cmdline.rs), and crashed at start-up on kvm_pvm.
for a in $("$BUSYBOX" --list); do
	case $a in busybox | modprobe | */* | "") continue ;; esac
	ln -s busybox "$ROOT/bin/$a"
	applets=$((applets + 1))
done
[ -e "$ROOT/bin/sh" ] || die "busybox has no 'sh' applet"
log "busybox: $applets applet links"

install -m 0755 "$INIT_SRC" "$ROOT/init"

printf '%s\n' \
	"proc /proc proc defaults 0 0" \
	"sysfs /sys sysfs defaults 0 0" \
	"devtmpfs /dev devtmpfs defaults 0 0" >"$ROOT/etc/fstab"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"

: >"$ROOT/lib/modules/order"
for m in "${ORDER[@]}"; do
	src=$MODDIR/${MOD_PATH[$m]}
	dst=$ROOT/lib/modules/$m.ko
	# Debian 12 ships plain .ko files; decompress here if that ever changes,
	# so the guest's insmod never has to.
	case $src in
	*.ko) cp "$src" "$dst" ;;
	*.ko.xz) need_tool xz xz-utils && xz -dc "$src" >"$dst" ;;
	*.ko.zst) need_tool zstd zstd && zstd -q -dc "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*) die "module $m: unknown file type $src" ;;
	esac
	chmod 0644 "$dst"
	echo "$m" >>"$ROOT/lib/modules/order"
done
log "modules (load order): ${ORDER[*]}"

if [ -n "$AGENT" ]; then
	install -m 0755 "$AGENT" "$ROOT/bin/spec"
	if command -v file >/dev/null && file -L "$AGENT" | grep -q 'dynamically linked'; then
		warn "$AGENT is dynamically linked; the initramfs has no libc or loader"
	fi
fi

{
	echo "kernel=$KVER"
	echo "kernel_package=$KERNEL_PKG $KERNEL_VER"
	echo "busybox_package=$BUSYBOX_PKG $BB_VER"
	echo "stamp=$STAMP"
} >"$ROOT/etc/specvm-release"

# ---------------------------------------------------------------------------
# initramfs archive: uncompressed newc. The guest kernel runs ~5000x slower
# than native here; a compressed archive would be decompressed by it.
# ---------------------------------------------------------------------------

find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
	"$CPIO" --quiet --null -o -H newc -R 0:0 --reproducible) >"$STAGE/initramfs.cpio" ||
	die "command failed: cpio -o (initramfs)"
log "initramfs.cpio: $(mib "$(stat -c %s "$STAGE/initramfs.cpio")"), $(cd "$ROOT" && find . -mindepth 1 | wc -l) entries"

# ---------------------------------------------------------------------------
# Manifest and install
# ---------------------------------------------------------------------------

{
	echo "# specvm guest image, built by images/build.sh"
	echo "stamp $STAMP"
	echo "package $KERNEL_META $META_VER (meta-package; resolved only)"
	for role in kernel busybox lz4 cpio; do
		echo "package ${PKG[$role]} ${VER[$role]} sha256=${SHA[$role]}"
	done
	echo "kernel-release $KVER"
	echo "vmlinux-entry $ENTRY"
	echo "vmlinux-pvh-entry $PVH_ENTRY"
	echo "modules ${ORDER[*]}"
	if [ -n "$AGENT" ]; then
		echo "guest-agent /bin/spec sha256=$AGENT_SHA (from ${AGENT#"$REPO"/})"
	else
		echo "guest-agent none"
	fi
	echo "# file size sha256"
	for f in bzImage vmlinux initramfs.cpio config; do
		echo "file $f $(stat -c %s "$STAGE/$f") $(sha256 "$STAGE/$f")"
	done
} >"$STAGE/manifest.txt"

rm -f "$OUT_DIR/stamp"
for f in "${OUTPUTS[@]}"; do
	mv -f "$STAGE/$f" "$OUT_DIR/$f"
done
echo "$STAMP" >"$OUT_DIR/stamp"
log "done: $OUT_DIR ($(cd "$OUT_DIR" && du -sh . | cut -f1))"
