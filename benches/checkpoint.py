#!/usr/bin/env python3
"""Checkpoint benchmark: speculate, commit and abort cost against guest
memory size and dirty pages, next to the naive full-copy checkpoint and
QEMU's savevm/loadvm, all measured in the same run.

    python3 benches/checkpoint.py [--quick] [--no-qemu] [--sizes 256M,1G,4G]
        [--dirty 1,100,2000] [--cpus 1,2,4] [--round-trips 2000] [--rt-runs 3]
        [--out FILE] [--baseline SPECVM] [--shadow-cost]

Our figures come from the VMM itself (`specvm run --stats`, at the default
log level): each operation is timed from the moment the controller has the
request until every vCPU may run again. The guest is `spec_bench` (see its
source): per repetition it dirties N pages and speculates, dirties N pages
and aborts, then dirties N pages, speculates, dirties N pages and commits. Guest-driven round trips
per second come from the same guest in its loop mode (speculate, dirty N
pages, abort, again), timed on the host between two lines it prints;
each cell is the median of `--rt-runs` runs (with `--baseline`, the two
builds alternate), with the lowest and highest beside it.

With 1 and 100 dirty pages both measured, the run also splits what one
more dirty page adds to a round trip: the VMM's memory steps (the
`checkpoint.memory` and `rollback.memory` medians) against everything
else, which is mostly the guest's own page faults on the host's KVM. That
split says how much of a round trip the VMM can still win.

`--shadow-cost` adds the round trips without this host's shadow page-table
reset (`SPECVM_UNSAFE_SKIP_SHADOW_RESET=1`, measurement only, see
vmm/src/host_compat/shadow.rs): the reset's whole cost, the slot move and
the guest's faults while KVM rebuilds its shadow tables, which a host with
EPT/NPT does not pay. spec_bench never changes its page tables, so its
results stay right without the reset.
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
LOG_FILTER = "warn,vmm::vstate::dirty=info"
FREE_BASE = 16 << 20  # the bare guest's data area starts at 16 MiB

MEM_SIZES = [("256M", 256), ("1G", 1024), ("4G", 4096)]
DIRTY = [1, 100, 2000, 10000, 100000]


def build():
    """Builds the release VMM and the bare guests."""
    subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-p", "specvm-tests", "--quiet"], cwd=ROOT, check=True)


def run_specvm(mem, pages, reps, mode="cow", cpus=1, phases=False, tracking=None, specvm=None):
    """Runs spec_bench once; returns the VMM's stats (median µs per op),
    with `phases` also the medians of the phases the VMM times inside
    each operation (dirty-page harvest, state save, state restore...),
    and under "tracking" the dirty-tracking method the VMM logged."""
    arg = pages | (reps << 32)
    # The VMM's default log level (warn), but for the line that names the
    # dirty-tracking method: at info, every operation also writes a log
    # line, which cost about 10 µs of each here (commit 15-20 µs against
    # 9 µs), a cost a user who keeps the default does not pay.
    cmd = [specvm or SPECVM, "--log-level", LOG_FILTER, "run", "--bare", GUEST, "--memory", mem,
           "--cpus", str(cpus), "--guest-arg", str(arg),
           "--serial", "null", "--stats", "--checkpoint", mode]
    env = dict(os.environ)
    if tracking:
        env["SPECVM_DIRTY_TRACKING"] = tracking
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    line = next(l for l in p.stderr.splitlines() if l.startswith("specvm-stats "))
    stats = json.loads(line.split(" ", 1)[1])
    out = {op: stats[op]["median_us"] for op in ("speculate", "commit", "abort")}
    if phases:
        out["phases"] = {k: v["median_us"] for k, v in stats.items()
                         if "." in k and isinstance(v, dict) and "median_us" in v}
    out["tracking"] = tracking_method(p.stderr)
    return out


def tracking_method(stderr):
    """The dirty-tracking method the VMM says it chose ("dirty tracking: ...")."""
    for l in stderr.splitlines():
        if "dirty tracking:" in l:
            return l.split("dirty tracking:", 1)[1].strip()
    return "bitmap (no log line)"


def round_trips(mem, pages, reps, cpus=1, mode="cow", specvm=None, env=None):
    """Guest-driven speculate/abort round trips per second: spec_bench in
    its loop mode, timed on the host between its `loop start` and
    `loop end` lines on the serial console. `env`: variables to add."""
    arg = pages | (reps << 32) | (1 << 63)
    cmd = [specvm or SPECVM, "run", "--bare", GUEST, "--memory", mem, "--cpus", str(cpus),
           "--guest-arg", str(arg), "--serial", "stdout", "--checkpoint", mode]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, **(env or {})))
    t0 = t1 = None
    try:
        for l in p.stdout:
            if "loop start" in l:
                t0 = time.perf_counter()
            elif "loop end" in l:
                t1 = time.perf_counter()
        rc = p.wait(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if rc != 0 or t0 is None or t1 is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}: {p.stderr.read().strip()[-2000:]}")
    return reps / (t1 - t0)


def fmt_rate(median, runs):
    """A rate a second with the range of its runs: `2,506 (2,359-2,533)`."""
    if len(runs) < 2:
        return f"{median:,.0f}"
    return f"{median:,.0f} ({min(runs):,.0f}-{max(runs):,.0f})"


def per_page_section(sizes, cpus, cow, rts, lines):
    """What one more dirty page adds to a guest-driven round trip, from
    the 1- and 100-page round trips, split into the VMM's memory steps
    (from the `--stats` phases of the same dirty counts) and the rest."""
    def mem_steps(c):
        ph = c.get("phases", {})
        return ph.get("checkpoint.memory", 0) + ph.get("rollback.memory", 0)

    rows = []
    for ncpu in cpus:
        for mem, _ in sizes:
            r1, r100 = rts.get((mem, 1, ncpu)), rts.get((mem, 100, ncpu))
            c1, c100 = cow.get((mem, 1, ncpu)), cow.get((mem, 100, ncpu))
            if not (r1 and r100 and c1 and c100):
                continue
            per_page = (1e6 / r100 - 1e6 / r1) / 99
            vmm = (mem_steps(c100) - mem_steps(c1)) / 99
            one = 1e6 / r1
            ops = c1["speculate"] + c1["abort"]
            rows.append(f"| {mem} | {ncpu} | {fmt_us(per_page)} | {fmt_us(vmm)} | {fmt_us(per_page - vmm)} | "
                        f"{fmt_us(one)} | {fmt_us(ops)} | {ops / one:.0%} |")
    if not rows:
        return
    lines.append("\n## What a round trip costs, and who pays it\n")
    lines.append("Per dirty page: the 100-page round trip less the 1-page one, over 99 pages. "
                 "The VMM's share is what the `checkpoint.memory` and `rollback.memory` medians "
                 "grow by per page; the rest is mostly the guest's write fault on each page, "
                 "which the host's KVM serves. The 1-page round trip set against the VMM's own "
                 "`speculate` and `abort` medians (the rest: the guest's exits into the VMM and "
                 "back, its faults after the rollback, and the threads' hand-offs).\n")
    lines.append("| memory | vCPUs | each dirty page adds to a round trip | of which the VMM's memory steps | "
                 "the rest | a 1-page round trip | the VMM's speculate + abort medians | their share |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        lines.append(r)
        print(r, flush=True)


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


def csv(kind):
    return lambda v: [kind(x) for x in v.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes, dirty counts, vCPU counts and repetitions")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU peer")
    ap.add_argument("--sizes", type=csv(str), help="memory sizes, e.g. 256M,1G,4G")
    ap.add_argument("--dirty", type=csv(int), help="dirty page counts, e.g. 1,100,2000")
    ap.add_argument("--cpus", type=csv(int), help="vCPU counts, e.g. 1,2,4")
    ap.add_argument("--reps", type=int, default=7, help="repetitions per specvm run")
    ap.add_argument("--round-trips", type=int, default=2000,
                    help="guest-driven speculate/abort round trips per run")
    ap.add_argument("--rt-runs", type=int, default=3,
                    help="runs per round-trip cell; the median is shown, with the range")
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--baseline", metavar="SPECVM",
                    help="an older specvm binary to run beside this one, interleaved: before/after columns")
    ap.add_argument("--shadow-cost", action="store_true",
                    help="also run the round trips without this host's shadow reset (measurement only)")
    ap.add_argument("--compare-tracking", action="store_true",
                    help="also time each dirty-tracking method (SPECVM_DIRTY_TRACKING) side by side")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "checkpoint.md"))
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("SKIPPED: no /dev/kvm on this machine")
        return 0
    if not args.no_build:
        build()
    names = dict(MEM_SIZES)
    sizes = [(m, names.get(m) or parse_mib(m)) for m in args.sizes] if args.sizes else (
        MEM_SIZES[:1] if args.quick else MEM_SIZES)
    dirty = args.dirty or ([1, 100, 2000] if args.quick else DIRTY)
    cpus = args.cpus or ([1] if args.quick else [1, 2, 4])
    lines = []
    out = lines.append

    out("## specvm: copy-on-write checkpoints (median of the VMM's own timings)\n")
    base_cols = " speculate (baseline) | abort (baseline) | speculate: baseline / this | abort: baseline / this |" if args.baseline else ""
    out("| memory | vCPUs | dirty pages | speculate | commit | abort | memcpy of the dirty pages | abort / memcpy | speculate / same at the smallest size |" + base_cols)
    out("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (4 if args.baseline else 0))
    cow = {}
    tracking = set()
    for ncpu in cpus:
        for mem, mib in sizes:
            for n in dirty:
                if not fits(mib, n):
                    out(f"| {mem} | {ncpu} | {n} | n/a: more pages than the guest has | | | | | |")
                    continue
                reps = 3 if n >= 100000 else args.reps
                if args.baseline:
                    b = run_specvm(mem, n, reps, cpus=ncpu, specvm=args.baseline)
                r = run_specvm(mem, n, reps, cpus=ncpu, phases=True)
                tracking.add(r["tracking"])
                cow[(mem, n, ncpu)] = r
                cp = memcpy_us(n)
                base = cow.get((sizes[0][0], n, ncpu))
                rel = f"{r['speculate'] / base['speculate']:.2f}x" if base and base["speculate"] else ""
                extra = ""
                if args.baseline:
                    extra = (f" {fmt_us(b['speculate'])} | {fmt_us(b['abort'])} | "
                             f"{b['speculate'] / max(r['speculate'], 1):.2f}x | {b['abort'] / max(r['abort'], 1):.2f}x |")
                out(f"| {mem} | {ncpu} | {n} | {fmt_us(r['speculate'])} | {fmt_us(r['commit'])} | "
                    f"{fmt_us(r['abort'])} | {fmt_us(cp)} | {r['abort'] / cp:.1f}x | {rel} |" + extra)
                print(lines[-1], flush=True)
    out(f"\nDirty tracking used: {', '.join(sorted(tracking))}.")

    phase_names = sorted({k for r in cow.values() for k in r.get("phases", {})})
    out("\n### Where the time goes: medians of the phases inside each operation\n")
    out("`dirty.harvest`: collecting the dirty pages (KVM and the VMM's own log); "
        "`checkpoint.memory` / `rollback.memory`: the whole memory step (harvest, flush or copy back); "
        "`checkpoint.state` / `rollback.state`: saving or restoring the vCPUs, the VM and the devices; "
        "`rollback.shadow_reset`: this host's shadow page-table reset.\n")
    out("| memory | vCPUs | dirty pages | " + " | ".join(phase_names) + " |")
    out("| --- | ---: | ---: |" + " ---: |" * len(phase_names))
    for (mem, n, ncpu), r in cow.items():
        ph = r.get("phases", {})
        out(f"| {mem} | {ncpu} | {n} | " + " | ".join(fmt_us(ph[k]) if k in ph else "" for k in phase_names) + " |")

    if args.compare_tracking:
        tracking_section(sizes, dirty, args.reps, lines)

    out(f"\n## Guest-driven round trips (speculate, dirty N pages, abort), {args.round_trips} per run, timed on the host\n")
    out(f"Median of {args.rt_runs} runs, lowest and highest in brackets.\n")
    bcols = " baseline round trips / s | this / baseline |" if args.baseline else ""
    scols = " without the shadow reset / s | reset's share of a round trip |" if args.shadow_cost else ""
    out("| memory | vCPUs | dirty pages | specvm round trips / s | naive full copy round trips / s | specvm / naive |" + bcols + scols)
    out("| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * ((2 if args.baseline else 0) + (2 if args.shadow_cost else 0)))
    rts = {}
    for ncpu in cpus:
        for mem, mib in sizes:
            for n in [x for x in (1, 100) if x in dirty]:
                runs, bruns = [], []
                for i in range(max(1, args.rt_runs)):
                    if args.baseline and i % 2:
                        bruns.append(round_trips(mem, n, args.round_trips, cpus=ncpu, specvm=args.baseline))
                    runs.append(round_trips(mem, n, args.round_trips, cpus=ncpu))
                    if args.baseline and not i % 2:
                        bruns.append(round_trips(mem, n, args.round_trips, cpus=ncpu, specvm=args.baseline))
                rt = statistics.median(runs)
                rts[(mem, n, ncpu)] = rt
                # The naive peer copies all of memory twice per round trip:
                # a handful of round trips is enough to time it.
                naive = round_trips(mem, n, 3, cpus=ncpu, mode="full-copy")
                extra = ""
                if args.baseline:
                    b = statistics.median(bruns)
                    extra = f" {fmt_rate(b, bruns)} | {rt / b:.2f}x |"
                if args.shadow_cost:
                    ns = round_trips(mem, n, args.round_trips, cpus=ncpu,
                                     env={"SPECVM_UNSAFE_SKIP_SHADOW_RESET": "1"})
                    extra += f" {ns:,.0f} | {(1 / rt - 1 / ns) * rt:.0%} |"
                out(f"| {mem} | {ncpu} | {n} | {fmt_rate(rt, runs)} | {naive:,.1f} | {rt / naive:,.0f}x |" + extra)
                print(lines[-1], flush=True)

    per_page_section(sizes, cpus, cow, rts, lines)

    out("\n## The naive peer: a full copy of guest memory per checkpoint (`--checkpoint full-copy`), 100 dirty pages, 1 vCPU\n")
    out("| memory | speculate (naive) | abort (naive) | speculate: naive / specvm | abort: naive / specvm |")
    out("| --- | ---: | ---: | ---: | ---: |")
    for mem, mib in sizes:
        c = cow.get((mem, 100, cpus[0]))
        if c is None:
            continue
        r = run_specvm(mem, 100, 2, "full-copy", cpus=cpus[0])
        out(f"| {mem} | {fmt_us(r['speculate'])} | {fmt_us(r['abort'])} | "
            f"{r['speculate'] / c['speculate']:.0f}x | {r['abort'] / c['abort']:.0f}x |")
        print(lines[-1], flush=True)

    if args.no_qemu:
        out("\nQEMU peer not run (--no-qemu).")
    else:
        qemu_section(sizes, {(m, n): r for (m, n, c), r in cow.items() if c == cpus[0]}, lines)

    cmdline = " ".join(["python3", "benches/checkpoint.py"] + sys.argv[1:])
    header = [
        "# Checkpoint benchmark",
        "",
        f"Produced by `{cmdline}` on "
        f"{datetime.date.today()} ({platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}).",
        "The machine is shared and noisy: read ratios, not absolute times.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")
    return 0


def tracking_section(sizes, dirty, reps, lines):
    """The three dirty-tracking methods in the same run, interleaved (each
    size and count runs ring, manual-protect, bitmap, three times over),
    1 vCPU: the harvest phase and the whole operations."""
    out = lines.append
    methods = ["ring", "manual-protect", "bitmap"]
    out("\n## Dirty tracking methods side by side (`SPECVM_DIRTY_TRACKING`), 1 vCPU\n")
    out("Each cell: the median over three interleaved runs of the run medians. "
        "`harvest` is collecting the dirty pages (KVM's record and the VMM's bitmap).\n")
    out("| memory | dirty pages | " + " | ".join(f"{m}: harvest / speculate / abort" for m in methods) +
        " | bitmap harvest / ring harvest |")
    out("| --- | ---: |" + " ---: |" * (len(methods) + 1))
    for mem, mib in sizes:
        for n in dirty:
            if not fits(mib, n) or n > 10000:
                continue
            got = {m: [] for m in methods}
            for _ in range(3):
                for m in methods:
                    got[m].append(run_specvm(mem, n, reps, phases=True, tracking=m))
            cells = []
            med = {}
            for m in methods:
                h = statistics.median(r["phases"].get("dirty.harvest", 0) for r in got[m])
                s = statistics.median(r["speculate"] for r in got[m])
                a = statistics.median(r["abort"] for r in got[m])
                med[m] = h
                cells.append(f"{fmt_us(h)} / {fmt_us(s)} / {fmt_us(a)}")
            ratio = f"{med['bitmap'] / med['ring']:.1f}x" if med["ring"] else ""
            out(f"| {mem} | {n} | " + " | ".join(cells) + f" | {ratio} |")
            print(lines[-1], flush=True)


def parse_mib(s):
    unit = {"M": 1, "G": 1024}[s[-1].upper()]
    return int(s[:-1]) * unit


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
