#!/usr/bin/env python3
"""Checkpoint benchmark: speculate, commit and abort cost against guest
memory size and dirty pages, next to the naive full-copy checkpoint and
QEMU's savevm/loadvm, all measured in the same run.

    python3 benches/checkpoint.py [--quick] [--no-qemu] [--out docs/benchmarks/checkpoint.md]

Our figures come from the VMM itself (`specvm run --stats`): each operation
is timed from the moment the controller has the request until every vCPU
may run again. The guest is `spec_bench` (see its source): per repetition
it dirties N pages and speculates, dirties N pages and aborts, then dirties
N pages, speculates, dirties N pages and commits.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECVM = os.path.join(ROOT, "target", "release", "specvm")
GUEST = os.path.join(ROOT, "target", "bare-guests", "spec_bench")
PAGE = 4096
FREE_BASE = 16 << 20  # the bare guest's data area starts at 16 MiB

MEM_SIZES = [("256M", 256), ("1G", 1024), ("4G", 4096)]
DIRTY = [1, 100, 2000, 10000, 100000]


def build():
    """Builds the release VMM and the bare guests."""
    subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-p", "specvm-tests", "--quiet"], cwd=ROOT, check=True)


def run_specvm(mem, pages, reps, mode="cow"):
    """Runs spec_bench once; returns the VMM's stats (median µs per op)."""
    arg = pages | (reps << 32)
    cmd = [SPECVM, "run", "--bare", GUEST, "--memory", mem, "--guest-arg", str(arg),
           "--serial", "null", "--stats", "--checkpoint", mode]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    line = next(l for l in p.stderr.splitlines() if l.startswith("specvm-stats "))
    stats = json.loads(line.split(" ", 1)[1])
    return {op: stats[op]["median_us"] for op in ("speculate", "commit", "abort")}


def memcpy_us(pages):
    """Median time to copy `pages` pages with one memcpy, in µs: the
    reference for "abort within 2x the cost of copying the dirty pages"."""
    src = bytearray(os.urandom(pages * PAGE))
    dst = bytearray(len(src))
    times = []
    for _ in range(7):
        t = time.perf_counter()
        dst[:] = src
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def fits(mem_mib, pages):
    return FREE_BASE + pages * PAGE <= mem_mib << 20


def fmt_us(us):
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs" if us >= 10 else f"{us:.1f} µs"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU peer")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "checkpoint.md"))
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIPPED: no /dev/kvm on this machine")
        return 0
    build()
    sizes = MEM_SIZES[:1] if args.quick else MEM_SIZES
    dirty = [1, 100, 2000] if args.quick else DIRTY
    lines = []
    out = lines.append

    out("## specvm: copy-on-write checkpoints (median of the VMM's own timings)\n")
    out("| memory | dirty pages | speculate | commit | abort | memcpy of the dirty pages | abort / memcpy |")
    out("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    cow = {}
    for mem, mib in sizes:
        for n in dirty:
            if not fits(mib, n):
                out(f"| {mem} | {n} | n/a: more pages than the guest has | | | | |")
                continue
            reps = 3 if n >= 100000 else 7
            r = run_specvm(mem, n, reps)
            cow[(mem, n)] = r
            cp = memcpy_us(n)
            out(f"| {mem} | {n} | {fmt_us(r['speculate'])} | {fmt_us(r['commit'])} | "
                f"{fmt_us(r['abort'])} | {fmt_us(cp)} | {r['abort'] / cp:.1f}x |")
            print(lines[-1], flush=True)

    out("\n## The naive peer: a full copy of guest memory per checkpoint (`--checkpoint full-copy`), 100 dirty pages\n")
    out("| memory | speculate (naive) | abort (naive) | speculate: naive / specvm | abort: naive / specvm |")
    out("| --- | ---: | ---: | ---: | ---: |")
    for mem, mib in sizes:
        r = run_specvm(mem, 100, 2, "full-copy")
        c = cow[(mem, 100)]
        out(f"| {mem} | {fmt_us(r['speculate'])} | {fmt_us(r['abort'])} | "
            f"{r['speculate'] / c['speculate']:.0f}x | {r['abort'] / c['abort']:.0f}x |")
        print(lines[-1], flush=True)

    if args.no_qemu:
        out("\nQEMU peer not run (--no-qemu).")
    else:
        qemu_section(sizes, cow, lines)

    header = [
        "# Checkpoint benchmark",
        "",
        f"Produced by `python3 benches/checkpoint.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today()} ({platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}).",
        "The machine is shared and noisy: read ratios, not absolute times.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")
    return 0


def qemu_section(sizes, cow, lines):
    """QEMU's savevm/loadvm on a guest of the same memory size.

    QEMU comes from benches/install-peer.sh (through qemu_peer.missing()).
    Without it, the section says "QEMU peer missing: <reason>" instead of
    leaving the QEMU columns out without a word.
    """
    out = lines.append
    out("\n## The peer: QEMU savevm / loadvm, same memory size, guest RAM filled with data\n")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import qemu_peer
    except ImportError as e:
        out(f"QEMU peer missing: benches/qemu_peer.py cannot be imported: {e}")
        print(lines[-1], flush=True)
        return
    reason = qemu_peer.missing()
    if reason is not None:
        out(f"QEMU peer missing: {reason}")
        print(lines[-1], flush=True)
        return
    out("Warm runs (the median of repetitions after the first, which pays one-time costs; the first is shown too).\n")
    out("| memory | QEMU savevm | QEMU loadvm | first savevm / loadvm | savevm / specvm speculate | loadvm / specvm abort |")
    out("| --- | ---: | ---: | ---: | ---: | ---: |")
    r = None
    for mem, mib in sizes:
        r = qemu_peer.measure(mib, filled=True, reps=3)
        if r is None:
            why = str(qemu_peer.last_error).replace("|", "\\|")
            out(f"| {mem} | not measured: {why} | | | | |")
            print(lines[-1], flush=True)
            continue
        save_us = statistics.median(r["savevm_ms"][1:]) * 1000
        load_us = statistics.median(r["loadvm_ms"][1:]) * 1000
        c = cow[(mem, 100)]
        out(f"| {mem} | {fmt_us(save_us)} | {fmt_us(load_us)} | "
            f"{fmt_us(r['savevm_ms'][0] * 1000)} / {fmt_us(r['loadvm_ms'][0] * 1000)} | "
            f"{save_us / c['speculate']:.0f}x | {load_us / c['abort']:.0f}x |")
        print(lines[-1], flush=True)
    out(f"\nQEMU: {r.get('qemu_version', '?') if r else '?'}; the specvm columns are for 100 dirty pages.")


if __name__ == "__main__":
    sys.exit(main())
