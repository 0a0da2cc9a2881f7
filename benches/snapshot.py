#!/usr/bin/env python3
"""Snapshot benchmark: restore time against guest memory size, and snapshot
create time, full and diff, next to QEMU's savevm/loadvm in the same run.

    python3 benches/snapshot.py [--quick] [--no-qemu] [--out docs/benchmarks/snapshot.md]

The guest is `counter` (guests/src/bin/counter.rs): it first writes one
word in every page of FILL MiB of its memory (so the snapshot has that much
memory to carry), then counts and prints every ~100 ms. Two fills per size:
`idle` (nothing written: only the guest's program, stack and page tables)
and `filled` (all memory but the first 32 MiB written).

Our figures:
- create: the VMM's own timing in the `snapshot` answer (`micros`), from
  the pause to the resume, files synced;
- diff: a second snapshot into the same directory ~0.3 s later;
- the disk's speed, for filled guests: the same number of bytes written to
  a new file beside the snapshot and fsynced, through O_DIRECT as specvm
  writes, and buffered, timed here: the bound a full create can approach;
- restore, three times: with `--verify before-start` (the memory layer
  checked before the guest starts), with `--verify before-output` (the
  default: the guest starts at once, its writes to devices wait for the
  check), and with `--verify background` (checked beside the running guest); each from the VMM's
  `restored` log line (`total_us`: reading and checking
  the state file, building memory from the layers, creating the VM and
  its vCPUs and devices, restoring their state) and, from the client side,
  the time from exec to the guest's first line after the restore.

The page cache is warm: the snapshot's files are read once before the
first restore (specvm writes its layers with O_DIRECT, past the cache);
nothing drops it, since other work shares this machine.
"""

import argparse
import ctypes
import datetime
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECVM = os.path.join(ROOT, "target", "release", "specvm")
GUEST = os.path.join(ROOT, "target", "bare-guests", "counter")
RESERVED_MIB = 32  # the bare guest's fixed layout and program, below its free area

SIZES = [("256M", 256), ("1G", 1024), ("4G", 4096)]
# When the host API asks a restored VM for its first speculation, after the
# guest's first line: the VM copies its base layer ahead, from the restore on.
FIRST_SPECULATE_S = 2


def build():
    """Builds the release VMM and the bare guests."""
    subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-p", "specvm-tests", "--quiet"], cwd=ROOT, check=True)


def wait_for(path, pattern, timeout, after=0):
    """Waits until the file at `path` has a line matching `pattern` past
    byte `after`; returns (match, time)."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(after)
                for line in f.read().decode(errors="replace").splitlines():
                    m = rx.search(line)
                    if m:
                        return m, time.perf_counter()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no line matching {pattern!r} in {path} after {timeout} s")


def ctl(sock, op, path=None):
    cmd = [SPECVM, "ctl", "--api-sock", sock, op] + (["--path", path] if path else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    resp = json.loads(p.stdout)
    if not resp.get("ok"):
        raise RuntimeError(f"{op}: {resp}")
    return resp


def create(tmp, mem, fill_mib):
    """Boots the counter, takes a full then a diff snapshot; returns the
    two answers."""
    sock, out, snap = (os.path.join(tmp, n) for n in ("api.sock", "boot.out", "snap"))
    cmd = [SPECVM, "run", "--bare", GUEST, "--memory", mem, "--guest-arg", str(fill_mib),
           "--serial", f"file={out}", "--api-sock", sock]
    vm = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_for(out, r"^counter: \d+$", 600)
        full = ctl(sock, "snapshot", snap)
        time.sleep(0.3)
        diff = ctl(sock, "snapshot", snap)
    finally:
        vm.kill()
        vm.wait()
    return full, diff, snap


def restore(tmp, snap, i, extra=(), speculate_after=None):
    """Restores `snap`; returns (VMM's restore µs, exec-to-first-line ms,
    restore's memory µs, first speculate's materialization µs). With
    `speculate_after` (seconds), the host API asks for a speculation that
    long after the guest's first line: the restored VM's first checkpoint,
    which gives it a memory file of its own."""
    out, err = os.path.join(tmp, f"r{i}.out"), os.path.join(tmp, f"r{i}.err")
    sock = os.path.join(tmp, f"r{i}.sock")
    api = ["--api-sock", sock] if speculate_after is not None else []
    t0 = time.perf_counter()
    with open(err, "w") as e:
        vm = subprocess.Popen([SPECVM, "run", "--restore", snap, "--serial", f"file={out}",
                               "--log-level", "info", *api, *extra], stderr=e)
    try:
        _, t1 = wait_for(out, r"^counter: \d+$", 120)
        if speculate_after is not None:
            time.sleep(speculate_after)
            ctl(sock, "speculate")
            mat, _ = wait_for(err, r"restored memory materialized micros=(\d+)", 60)
    finally:
        vm.kill()
        vm.wait()
    m, _ = wait_for(err, r"restored (state_us=\d+ )?memory_us=(\d+) .*total_us=(\d+)", 5)
    first = int(mat.group(1)) if speculate_after is not None else None
    return int(m.group(3)), (t1 - t0) * 1e3, int(m.group(2)), first


def disk_write_ms(tmp, mib, direct, distinct=False, huge=False):
    """The disk's own speed, for the full create to be judged by: time to
    write `mib` MiB of random bytes into a new file beside the snapshot,
    then fsync it and its directory, as a snapshot's memory file is
    written; with `direct`, through O_DIRECT (the page cache bypassed, as
    specvm writes its layers), else buffered. By default one 1 MiB buffer
    is written over and over; with `distinct`, `mib` MiB of memory are
    written once each, in 8 MiB writes, as a snapshot writes guest memory
    (on this host, a disk write from many distinct pages is slower than
    from the same few). With `huge`, one 8 MiB buffer on transparent huge
    pages is written over and over, in 8 MiB writes: the disk at its
    fastest, the way specvm writes (through such buffers, see `Bounce` in
    vmm/src/snapshot/writer.rs). Best of 2."""
    size = (mib if distinct else 8 if huge else 1) << 20
    step = min(size, 8 << 20) if distinct or huge else 1 << 20
    if huge:
        # 2 MiB-aligned inside a larger mapping, so that whole huge pages
        # back it where the host gives them.
        space = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        first = ctypes.c_char.from_buffer(space)
        skip = -ctypes.addressof(first) % (2 << 20)
        del first  # it holds the mapping open
        space.madvise(mmap.MADV_HUGEPAGE, skip, size)
        chunk = memoryview(space)[skip:skip + size]
    else:
        space = chunk = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    block = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        chunk[off:off + (1 << 20)] = block
    view = memoryview(chunk)
    best = None
    for i in range(2):
        path = os.path.join(tmp, f"disk-speed-{i}")
        t = time.perf_counter()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags, 0o600)
        try:
            for off in range(0, mib << 20, step):
                os.pwrite(fd, view[off % size:off % size + step], off)
            os.fsync(fd)
        finally:
            os.close(fd)
        d = os.open(tmp, os.O_RDONLY)
        os.fsync(d)
        os.close(d)
        ms = (time.perf_counter() - t) * 1e3
        os.unlink(path)
        best = ms if best is None else min(best, ms)
    view.release()
    if huge:
        chunk.release()
    space.close()
    return best


def warm(snap):
    """Reads every file of `snap` once, into the page cache."""
    for name in os.listdir(snap):
        with open(os.path.join(snap, name), "rb") as f:
            while f.read(8 << 20):
                pass


def du_mib(path):
    return sum(os.stat(os.path.join(path, f)).st_blocks * 512 for f in os.listdir(path)) / 2**20


def measure(mem, mib, fill_mib, reps, disk_speed=True):
    tmp = tempfile.mkdtemp(prefix="specvm-snapbench.")
    try:
        full, diff, snap = create(tmp, mem, fill_mib)
        disk = du_mib(snap)
        warm(snap)
        # The three modes interleaved, so that the machine's noise falls on
        # each alike.
        rs, held, bg = [], [], []
        for i in range(reps):
            rs.append(restore(tmp, snap, 3 * i, ("--verify", "before-start")))
            held.append(restore(tmp, snap, 3 * i + 1, ("--verify", "before-output"),
                                speculate_after=FIRST_SPECULATE_S))
            bg.append(restore(tmp, snap, 3 * i + 2, ("--verify", "background")))
        speed = disk_speed and fill_mib
        return {
            "disk_ms": disk_write_ms(tmp, round(disk), True) if speed else None,
            "disk_distinct_ms": (disk_write_ms(tmp, round(disk), True, distinct=True)
                                 if speed else None),
            "disk_huge_ms": (disk_write_ms(tmp, round(disk), True, huge=True)
                             if speed else None),
            "buffered_ms": disk_write_ms(tmp, round(disk), False) if speed else None,
            "mem_mib": mib, "fill_mib": fill_mib,
            "full_ms": full["micros"] / 1e3, "diff_ms": diff["micros"] / 1e3,
            "diff_pages": diff.get("pages"), "disk_mib": disk,
            "restore_ms": statistics.median(r[0] for r in rs) / 1e3,
            "restore_mem_ms": statistics.median(r[2] for r in rs) / 1e3,
            "first_line_ms": statistics.median(r[1] for r in rs),
            "held_restore_ms": statistics.median(r[0] for r in held) / 1e3,
            "held_first_line_ms": statistics.median(r[1] for r in held),
            "first_speculate_ms": statistics.median(r[3] for r in held) / 1e3,
            "bg_restore_ms": statistics.median(r[0] for r in bg) / 1e3,
            "bg_first_line_ms": statistics.median(r[1] for r in bg),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def qemu(sizes):
    """QEMU's savevm/loadvm per size: ({mib: result}, notes). QEMU comes from
    benches/install-peer.sh (through qemu_peer.missing()); without it, or
    when a size fails, `notes` says why ("QEMU peer missing: <reason>"), so
    that the empty QEMU columns are explained in the output and the report."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import qemu_peer
    except ImportError as e:
        return {}, [f"QEMU peer missing: benches/qemu_peer.py cannot be imported: {e}"]
    reason = qemu_peer.missing()
    if reason is not None:
        return {}, [f"QEMU peer missing: {reason}"]
    out, notes = {}, []
    for _, mib in sizes:
        r = qemu_peer.measure(mib, filled=True, reps=2)
        if r:
            out[mib] = r
        else:
            notes.append(f"QEMU peer: {mib} MiB not measured: {qemu_peer.last_error}")
            continue
        # The same with the image's writes flushed to the disk (QEMU's
        # default cache mode): durable, as a specvm snapshot is.
        w = qemu_peer.measure(mib, filled=True, reps=2, cache="writeback")
        if w and w.get("savevm_ms"):
            r["savevm_flushed_ms"] = w["savevm_ms"]
        else:
            notes.append(f"QEMU peer: {mib} MiB with cache=writeback not measured: "
                         f"{qemu_peer.last_error}")
    return out, notes


def table(rows, q):
    lines = [
        f"| memory | written by guest | full create | the same bytes written and fsynced: O_DIRECT from one 1 MiB buffer / O_DIRECT from as much distinct memory / O_DIRECT from one 8 MiB buffer on huge pages / buffered | diff create (pages) | on disk | restore, checked before start (`--verify before-start`) | of which memory | exec to first guest line | restore, output held for the check (`--verify before-output`, the default) | its exec to first line | its first speculate, {FIRST_SPECULATE_S} s after the first line: giving the VM a memory file of its own | restore, memory checked beside the guest (`--verify background`) | its exec to first line | QEMU savevm (cache=unsafe: left in the page cache) | QEMU savevm, flushed (cache=writeback) | QEMU loadvm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        qr = q.get(r["mem_mib"]) if r["fill_mib"] else None
        sv = f"{min(qr['savevm_ms']):.0f} ms" if qr and qr.get("savevm_ms") else "–"
        lv = f"{min(qr['loadvm_ms']):.0f} ms" if qr and qr.get("loadvm_ms") else "–"
        sf = (f"{min(qr['savevm_flushed_ms']):.0f} ms"
              if qr and qr.get("savevm_flushed_ms") else "–")
        lines.append(
            f"| {r['mem_mib']} MiB | {r['fill_mib']} MiB | {r['full_ms']:.1f} ms | "
            f"{(format(r['disk_ms'], '.0f') + ' / ' + format(r['disk_distinct_ms'], '.0f') + ' / ' + format(r['disk_huge_ms'], '.0f') + ' / ' + format(r['buffered_ms'], '.0f') + ' ms') if r.get('disk_ms') else '–'} | "
            f"{r['diff_ms']:.1f} ms ({r['diff_pages']}) | {r['disk_mib']:.0f} MiB | "
            f"{r['restore_ms']:.1f} ms | {r['restore_mem_ms']:.1f} ms | {r['first_line_ms']:.0f} ms | "
            f"{r['held_restore_ms']:.1f} ms | {r['held_first_line_ms']:.0f} ms | "
            f"{r['first_speculate_ms']:.1f} ms | "
            f"{r['bg_restore_ms']:.1f} ms | {r['bg_first_line_ms']:.0f} ms | {sv} | {sf} | {lv} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB only, one restore each")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU peer")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-disk-speed", action="store_true",
                    help="skip timing the disk's own write speed (four writes of each filled size)")
    ap.add_argument("--reps", type=int, help="restores per mode (default 3, 1 with --quick)")
    ap.add_argument("--out", help="write a markdown report here")
    a = ap.parse_args()
    if not a.no_build:
        build()
    sizes = SIZES[:2] if a.quick else SIZES
    reps = a.reps or (1 if a.quick else 3)
    rows = []
    for mem, mib in sizes:
        for fill in (0, mib - RESERVED_MIB):
            r = measure(mem, mib, fill, reps, not a.no_disk_speed)
            print(json.dumps(r), flush=True)
            rows.append(r)
    q, qnotes = ({}, ["QEMU peer not run (--no-qemu)"]) if a.no_qemu else qemu(sizes)
    for mib, r in q.items():
        print(f"qemu {mib} MiB filled: savevm {r['savevm_ms']} ms, "
              f"flushed {r.get('savevm_flushed_ms')} ms, loadvm {r['loadvm_ms']} ms", flush=True)
    lines = table(rows, q)
    print("\n".join(lines))
    if qnotes:
        print("\n".join(qnotes))
    base = {r["mem_mib"]: r for r in rows if r["fill_mib"] == 0}
    ratios = []
    for r in rows:
        if r["fill_mib"] and r["mem_mib"] in q and q[r["mem_mib"]].get("loadvm_ms"):
            ratios.append(f"{r['mem_mib']} MiB filled: QEMU loadvm / specvm restore = "
                          f"{min(q[r['mem_mib']]['loadvm_ms']) / r['restore_ms']:.1f}x checked "
                          f"before start, "
                          f"{min(q[r['mem_mib']]['loadvm_ms']) / r['held_restore_ms']:.0f}x with "
                          f"the output held (the default), "
                          f"savevm / full create = "
                          f"{min(q[r['mem_mib']]['savevm_ms']) / r['full_ms']:.2f}x"
                          + (f", flushed savevm / full create = "
                             f"{min(q[r['mem_mib']]['savevm_flushed_ms']) / r['full_ms']:.2f}x"
                             if q[r['mem_mib']].get("savevm_flushed_ms") else ""))
    for r in rows:
        if r.get("disk_ms"):
            ratios.append(f"{r['mem_mib']} MiB filled: full create / the disk writing and syncing "
                          f"the same bytes with O_DIRECT = {r['full_ms'] / r['disk_ms']:.2f}x "
                          f"from one buffer, {r['full_ms'] / r['disk_distinct_ms']:.2f}x from "
                          f"distinct memory, {r['full_ms'] / r['disk_huge_ms']:.2f}x from huge "
                          f"pages (buffered: {r['full_ms'] / r['buffered_ms']:.2f}x)")
    small = base.get(sizes[0][1])
    for mib, r in base.items():
        if small and mib != small["mem_mib"]:
            ratios.append(f"idle restore {mib} MiB / {small['mem_mib']} MiB = "
                          f"{r['restore_ms'] / small['restore_ms']:.2f}x")
    print("\n".join(ratios))
    if a.out:
        host = f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}"
        with open(a.out, "w") as f:
            f.write(f"<!-- generated by benches/snapshot.py on {datetime.date.today()}, {host} -->\n")
            f.write("\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in qnotes + ratios) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
