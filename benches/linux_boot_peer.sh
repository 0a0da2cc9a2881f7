#!/usr/bin/env bash
# The Linux boot against QEMU (Debian's qemu-system-x86), on this machine,
# with the same vmlinux and initramfs (images/out/):
#   - QEMU with KVM (-accel kvm), the CPU model trimmed as specvm's CPUID
#     is (no XSAVE, no CX16; `noxsave` on the command line): on a kvm_pvm
#     host it cannot complete the instructions the host cannot emulate, so
#     it stops somewhere; the script records where and when;
#   - QEMU with TCG (-accel tcg): software emulation, the peer a user of
#     this host would pick for a plain boot.
#   - specvm through its boot cache (`specvm run --boot-cache`, the same
#     configuration as scripts/demo and the Linux tests, so they share the
#     entry): the start a user makes after the first one, measured from the
#     exec to the init's ready line. With a cold cache that start is the
#     15-20 minute boot itself; the script then stops it and says so, unless
#     SPECVM_BENCH_BOOT=1 lets it boot (and fill the cache).
# specvm's cold boot time comes from its Linux test (docs/linux-boot.md).
#
# Prints the wall time at which each milestone line reached the console.
# Usage: benches/linux_boot_peer.sh [KVM_TIMEOUT_S] [TCG_TIMEOUT_S]  (600, 120)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/images/out
KVM_TIMEOUT=${1:-600}
TCG_TIMEOUT=${2:-120}
for f in vmlinux initramfs.cpio disk.ext4; do
	[ -s "$OUT/$f" ] || { echo "missing $OUT/$f: run images/build.sh" >&2; exit 1; }
done
# QEMU comes from benches/install-peer.sh, the one place that installs the
# peer (a matching qemu-system-x86 / qemu-utils pair; it may need root).
# QEMU_PEER_INSTALL=0 only checks. Without a peer there is nothing to
# measure: its "QEMU peer missing: <reason>" line is the output, exit 1.
PEER_ARGS=()
[ "${QEMU_PEER_INSTALL:-1}" != 0 ] || PEER_ARGS=(--check)
"$ROOT/benches/install-peer.sh" "${PEER_ARGS[@]}" >&2 || exit 1
TMP=$(mktemp -d)
QPID=
cleanup() { [ -z "$QPID" ] || kill "$QPID" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

MILESTONES=("Linux version" "x86/fpu: x87 FPU will use FXSAVE" "Freeing unused kernel image" "Run /init as init process" "SPECVM-READY")
CMDLINE="console=ttyS0 panic=-1 noxsave nokaslr tsc_early_khz=2000000 nowatchdog nosoftlockup mitigations=off"

# run NAME TIMEOUT QEMU-ARGS...: boots, prints milestones with wall times.
run() {
	local name=$1 timeout=$2
	shift 2
	local log=$TMP/$name.log
	: >"$log"
	local start
	start=$(date +%s.%N)
	qemu-system-x86_64 "$@" -M microvm,acpi=on -m 256 -smp 1 -display none \
		-serial "file:$log" -monitor none -no-reboot \
		-kernel "$OUT/vmlinux" -initrd "$OUT/initramfs.cpio" -append "$CMDLINE" \
		</dev/null >"$TMP/$name.err" 2>&1 &
	QPID=$!
	local seen=() i
	while :; do
		for i in "${!MILESTONES[@]}"; do
			if [ -z "${seen[$i]:-}" ] && grep -qF "${MILESTONES[$i]}" "$log"; then
				seen[$i]=$(echo "$(date +%s.%N) - $start" | bc)
				printf '%s: %-36s %8.1f s\n' "$name" "${MILESTONES[$i]}" "${seen[$i]}"
			fi
		done
		[ -n "${seen[4]:-}" ] && break
		if ! kill -0 "$QPID" 2>/dev/null; then
			printf '%s: QEMU ended after %.1f s, before SPECVM-READY\n' "$name" "$(echo "$(date +%s.%N) - $start" | bc)"
			break
		fi
		if [ "$(echo "$(date +%s.%N) - $start > $timeout" | bc)" = 1 ]; then
			printf '%s: no SPECVM-READY within %s s\n' "$name" "$timeout"
			break
		fi
		sleep 0.2
	done
	kill "$QPID" 2>/dev/null || true
	wait "$QPID" 2>/dev/null || true
	QPID=
	echo "$name: last console lines:"
	tail -n 4 "$log" | sed "s/^/  | /"
	if [ -s "$TMP/$name.err" ]; then
		echo "$name: QEMU said:"
		tail -n 6 "$TMP/$name.err" | sed "s/^/  ! /"
	fi
}

# specvm_cached: the warm start, from the exec to SPECVM-READY.
specvm_cached() {
	local bin=$ROOT/target/release/specvm bridge=$ROOT/target/release/netbridge
	if [ ! -x "$bin" ] || [ ! -x "$bridge" ]; then
		(cd "$ROOT" && cargo build --release --quiet -p vmm -p netbridge)
	fi
	"$bridge" --listen "$TMP/br.sock" >/dev/null 2>&1 &
	local bpid=$!
	for _ in $(seq 100); do [ -S "$TMP/br.sock" ] && break; sleep 0.05; done
	local log=$TMP/specvm.log err=$TMP/specvm.err start
	: >"$log"
	start=$(date +%s.%N)
	"$bin" run --kernel "$OUT/vmlinux" --initrd "$OUT/initramfs.cpio" --memory 512M --cpus 2 \
		--net "bridge=$TMP/br.sock,mac=52:54:00:00:00:01" --disk "path=$OUT/disk.ext4" --boot-cache \
		</dev/null >"$log" 2>"$err" &
	QPID=$!
	local line=
	while kill -0 "$QPID" 2>/dev/null; do
		if grep -q "SPECVM-READY" "$log"; then
			printf 'specvm (boot cache): %-27s %8.2f s\n' "SPECVM-READY" "$(echo "$(date +%s.%N) - $start" | bc)"
			break
		fi
		line=$(grep -m1 "specvm: boot cache:" "$err" || true)
		if [ -z "${SPECVM_BENCH_BOOT:-}" ] && [[ $line == *booting* ]]; then
			echo "specvm (boot cache): cold cache, not measured ($line); run scripts/demo or scripts/test once, or set SPECVM_BENCH_BOOT=1"
			break
		fi
		sleep 0.02
	done
	grep -m1 "specvm: boot cache:" "$err" | sed 's/^/  | /' || true
	kill "$QPID" "$bpid" 2>/dev/null || true
	wait "$QPID" "$bpid" 2>/dev/null || true
	QPID=
}

[ "${SKIP_SPECVM:-}" ] || specvm_cached
echo "qemu: $(qemu-system-x86_64 --version | head -1)"
[ "${SKIP_TCG:-}" ] || run tcg "$TCG_TIMEOUT" -accel tcg
run kvm "$KVM_TIMEOUT" -accel kvm -cpu max,-arch-capabilities,-xsave,-cx16,-xsaveopt,-xsavec,-xsaves,-avx,-avx2
