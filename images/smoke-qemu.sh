#!/usr/bin/env bash
# Boot images/out/{vmlinux,initramfs.cpio} under QEMU's software emulator
# (TCG, no KVM) as a quick check of the image and its /init: a few seconds,
# against ~20 minutes on this host's KVM. Not part of the build; optional.
#
# Passes if the guest prints SPECVM-READY after configuring eth0 and
# mounting its disk (a copy of images/out/disk.ext4), with no failed step. QEMU's microvm machine describes its virtio-mmio devices in
# ACPI, which is how Debian's kernel finds them (it is built without
# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so virtio_mmio.device= does nothing).
#
# Usage: images/smoke-qemu.sh [TIMEOUT_SECONDS]   (default 60)
set -euo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_DIR=$IMAGES_DIR/out
TIMEOUT=${1:-60}

die() {
	printf 'smoke: error: %s\n' "$*" >&2
	exit 1
}

for f in vmlinux initramfs.cpio disk.ext4; do
	[ -s "$OUT_DIR/$f" ] || die "missing $OUT_DIR/$f; run images/build.sh first"
done
if ! command -v qemu-system-x86_64 >/dev/null; then
	[ "$(id -u)" -eq 0 ] || die "qemu-system-x86_64 missing (Debian package qemu-system-x86)"
	echo "smoke: installing host package qemu-system-x86"
	DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends \
		install qemu-system-x86 >/dev/null || die "command failed: apt-get install qemu-system-x86"
fi

TMP=$(mktemp -d)
QEMU_PID=
cleanup() {
	[ -z "$QEMU_PID" ] || kill "$QEMU_PID" 2>/dev/null || true
	rm -rf "$TMP"
}
trap cleanup EXIT
# A copy: the guest mounts the disk read-write.
cp --sparse=always "$OUT_DIR/disk.ext4" "$TMP/disk.img"
LOG=$TMP/console.log

# tsc_early_khz: without it, TSC calibration can fail and the boot hang when
# the host is busy (TCG time is not steady).
qemu-system-x86_64 -M microvm,acpi=on -accel tcg -m 256 -smp 1 \
	-display none -serial "file:$LOG" -monitor none -no-reboot \
	-kernel "$OUT_DIR/vmlinux" -initrd "$OUT_DIR/initramfs.cpio" \
	-append "console=ttyS0 panic=-1 tsc_early_khz=2000000 specvm.ip=10.0.2.15/24 specvm.gw=10.0.2.2" \
	-netdev user,id=n0 -device virtio-net-device,netdev=n0 \
	-drive if=none,id=d0,file="$TMP/disk.img",format=raw -device virtio-blk-device,drive=d0 \
	</dev/null 2>"$TMP/qemu.err" &
QEMU_PID=$!

start=$SECONDS
until grep -q '^SPECVM-READY' "$LOG" 2>/dev/null; do
	if ! kill -0 "$QEMU_PID" 2>/dev/null; then
		cat "$LOG" "$TMP/qemu.err" >&2 || true
		die "QEMU exited before SPECVM-READY"
	fi
	if [ $((SECONDS - start)) -ge "$TIMEOUT" ]; then
		cat "$LOG" "$TMP/qemu.err" >&2 || true
		die "no SPECVM-READY within ${TIMEOUT}s"
	fi
	sleep 0.2
done
sleep 0.5 # let the console drain

grep '^specvm-init:' "$LOG"
# `spec ready` is specvm's hypercall (the boot cache's ready point); QEMU
# has no such device, so that one step fails here by design.
grep 'specvm-init: .* failed' "$LOG" | grep -qv 'spec ready failed' &&
	die "a step of /init failed (see above)"
grep -q 'specvm-init: .*network eth0' "$LOG" || die "eth0 was not configured"
grep -q '\[vda\]' "$LOG" || die "no virtio block device vda"
grep -q 'specvm-init: .*mounted /dev/vda' "$LOG" || die "vda was not mounted on /mnt"
echo "smoke: SPECVM-READY after $((SECONDS - start))s; eth0 configured, vda mounted"
