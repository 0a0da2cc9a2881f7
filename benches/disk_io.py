#!/usr/bin/env python3
"""specvm's virtio-blk against QEMU's block layer: 4 KiB requests, one at a time.

What runs, in one run of this script, on one raw image file:
  specvm  the bare guest guests/src/bin/blk_bench.rs drives `--disk` through
          virtio-mmio, request by request (queue depth 1): sequential and
          strided ("random") writes and reads at depth 0 (straight to the
          image), then the same strided writes and reads inside a speculation
          (into the overlay), then an abort. The times are taken on the host
          from the guest's console lines that open and close each phase.
  QEMU    `qemu-img bench` (Debian's qemu-utils, the same block layer QEMU's
          virtio-blk uses), with the same request size, queue depth 1, the
          same order (`-S`, the stride, which wraps at the image's end) and
          the page cache (`-t writeback`, QEMU's default for a disk).

Why qemu-img and not a guest in QEMU: on this project's hosts /dev/kvm is
kvm_pvm, which emulates guest kernel code (see shared/design/HOST-KVM.md), so
a driver in a QEMU guest would run emulated, and a QEMU guest's throughput
would measure the emulator. specvm's bare guest runs its driver at CPL3,
natively, and each request is a real MMIO exit to the VMM; `qemu-img bench`
is QEMU's block path with no guest and no exit at all, so the ratio is an
upper bound on what specvm's device path costs over QEMU's.

--checkpoint adds the disk + memory checkpoint: a 256 MiB VM with a 1 GiB disk
on which N blocks of 4 KiB were written (N = 10, 1,000, 100,000). specvm:
blk_bench writes the N blocks at depth 0, speculates, writes N more blocks
inside the speculation and aborts; `--stats` gives the speculate and the abort.
QEMU (benches/qemu_peer.py): an idle 256 MiB guest with a 1 GiB qcow2 data disk
holding N blocks of data (written by qemu-io), savevm then loadvm, which
snapshot and revert every writable image; the same guest without the data disk
is measured too, so the disk's share shows.

Usage: python3 benches/disk_io.py [--ops 4096] [--reps 3] [--size-mib 256] [--checkpoint]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECVM = os.path.join(ROOT, "target", "release", "specvm")
GUEST = os.path.join(ROOT, "target", "bare-guests", "blk_bench")
BLOCK = 4096
STRIDE = 7919  # blocks; the guest's STRIDE
PHASES = ["seq-write", "seq-read", "rnd-write", "rnd-read", "spec-write", "spec-read"]


def build():
    subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-p", "specvm-tests", "--quiet"], cwd=ROOT, check=True)


def run_specvm(img, ops):
    """One run of blk_bench: seconds per phase, and the abort's µs."""
    cmd = [SPECVM, "run", "--bare", GUEST, "--memory", "64M", "--guest-arg", str(ops),
           "--disk", f"path={img}", "--stats"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    start, took, lines = {}, {}, []
    pat = re.compile(rb"blk_bench: (\S+) (start|done)")
    buf = b""
    while True:
        chunk = p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(1)
        now = time.perf_counter()
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(line)
            m = pat.search(line)
            if m:
                name, what = m.group(1).decode(), m.group(2)
                if what == b"start":
                    start[name] = now
                elif name in start:
                    took[name] = now - start[name]
    err = p.stderr.read().decode()
    if p.wait() != 0 or set(took) != set(PHASES):
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n"
                           + b"\n".join(lines[-5:]).decode(errors="replace") + "\n" + err[-2000:])
    stats = next(l for l in err.splitlines() if l.startswith("specvm-stats "))
    abort_us = json.loads(stats.split(" ", 1)[1])["abort"]["median_us"]
    return took, abort_us


def run_specvm_checkpoint(img, blocks):
    """speculate and abort µs of blk_bench's checkpoint mode."""
    cmd = [SPECVM, "run", "--bare", GUEST, "--memory", "256M", "--guest-arg",
           str(blocks | (1 << 32)), "--disk", f"path={img}", "--stats", "--serial", "null",
           "--checkpoint-budget", "unlimited"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    line = next(l for l in p.stderr.splitlines() if l.startswith("specvm-stats "))
    s = json.loads(line.split(" ", 1)[1])
    return s["speculate"]["median_us"], s["abort"]["median_us"]


def checkpoint_table(reps):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import qemu_peer
    why = qemu_peer.missing()
    rows = []
    base = None if why else qemu_peer.measure(256, False, reps=reps + 1)
    for blocks in [10, 1000, 100000]:
        with tempfile.TemporaryDirectory(prefix="disk_io.") as d:
            img = os.path.join(d, "disk.raw")
            with open(img, "wb") as f:
                f.truncate(1 << 30)
            ours = [run_specvm_checkpoint(img, blocks) for _ in range(reps)]
        q = None if why else qemu_peer.measure(256, False, reps=reps + 1,
                                               data_disk=(1024, blocks * 4))
        rows.append((blocks, ours, q))
    med = statistics.median
    print()
    print("# disk + memory checkpoint: 256 MiB VM, 1 GiB disk with N blocks of 4 KiB written; "
          f"median of {reps} (QEMU: of its later reps, the first is cold)")
    if why:
        print(f"QEMU peer missing: {why}")
    print("| N blocks | specvm speculate | specvm abort (N more blocks written inside) | "
          "QEMU savevm | QEMU loadvm | savevm / speculate |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    later = (lambda r, k: med(r[k][1:]) if r and len(r[k]) > 1 else None)
    if base:
        print(f"| no data disk | | | {later(base, 'savevm_ms'):.1f} ms | "
              f"{later(base, 'loadvm_ms'):.1f} ms | |")
    for blocks, ours, q in rows:
        sp, ab = med([o[0] for o in ours]), med([o[1] for o in ours])
        sv, lv = later(q, "savevm_ms"), later(q, "loadvm_ms")
        qs = f"{sv:.1f} ms | {lv:.1f} ms | {sv * 1e3 / sp:,.0f}x" if sv else "- | - | -"
        print(f"| {blocks:,} | {sp:.0f} µs | {ab / 1e3:.2f} ms | {qs} |")


def run_qemu(img, ops, write, step):
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "writeback", "-c", str(ops), "-s", str(BLOCK),
           "-S", str(step), "-d", "1"] + (["-w"] if write else []) + [img]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=4096, help="requests per phase")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256, help="the image's size")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--checkpoint", action="store_true",
                    help="also the disk + memory checkpoint against QEMU savevm")
    a = ap.parse_args()
    if not a.no_build:
        build()
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True)
    if qemu.returncode != 0:
        print("QEMU peer missing: qemu-img does not run (install qemu-utils)")
        return 1
    with tempfile.TemporaryDirectory(prefix="disk_io.") as d:
        img = os.path.join(d, "disk.raw")
        # A written image (not a hole), so reads find data on both sides.
        with open(img, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(a.size_mib):
                f.write(chunk)
        ours = {k: [] for k in PHASES}
        aborts = []
        peer = {k: [] for k in ["seq-write", "seq-read", "rnd-write", "rnd-read"]}
        for _ in range(a.reps):
            took, ab = run_specvm(img, a.ops)
            for k, v in took.items():
                ours[k].append(v)
            aborts.append(ab)
            for k in peer:
                write = k.endswith("write")
                step = BLOCK * (STRIDE if k.startswith("rnd") else 1)
                peer[k].append(run_qemu(img, a.ops, write, step))
    print(f"# {a.ops} requests of 4 KiB per phase, queue depth 1, {a.size_mib} MiB raw image, "
          f"median of {a.reps}; {qemu.stdout.splitlines()[0]}")
    print("| phase | specvm (bare guest) | IOPS | QEMU block layer (qemu-img bench) | IOPS | "
          "specvm time / QEMU time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in PHASES:
        t = statistics.median(ours[k])
        row = f"| {k} | {t * 1e3:.1f} ms | {a.ops / t:,.0f} |"
        q = peer.get(k.replace("spec-", "rnd-"))
        if q:
            qt = statistics.median(q)
            label = "" if k in peer else " (its rnd-)"
            row += f" {qt * 1e3:.1f} ms{label} | {a.ops / qt:,.0f} | {t / qt:.1f}x |"
        else:
            row += " | | |"
        print(row)
    print(f"abort of the speculation that wrote {a.ops} blocks: "
          f"{statistics.median(aborts):.0f} µs (specvm --stats, median of {a.reps})")
    if a.checkpoint:
        checkpoint_table(a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
