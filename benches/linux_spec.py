#!/usr/bin/env python3
"""The host-side cost of `spec speculate` / `spec abort` / `spec commit` in a Linux guest.

Restores the Linux tests' snapshot (or one given), runs in the guest's shell
N times `if spec speculate; then spec abort; fi` and N times
`spec speculate; spec commit`, powers the guest off, and prints the VMM's
`--stats` (median, min and max of each operation, in µs, measured in the VMM
from the hypercall to the vCPU's resumption) next to the guest's own
wall time per loop (which adds two exec()s of `spec` under this host's
emulated guest kernel). The same operations from a bare guest (spec_bench,
one dirty page, the same memory size) run in the same script as the
reference: the difference is what a Linux guest's state adds.

Usage: python3 benches/linux_spec.py [--snapshot DIR] [--loops 20]
The snapshot defaults to target/tmp/linux-snapshot, which the Linux tests
leave (scripts/test, or `cargo test -p specvm-tests --test linux`).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECVM = os.path.join(ROOT, "target", "release", "specvm")
BENCH_GUEST = os.path.join(ROOT, "target", "bare-guests", "spec_bench")


def stats_of(stderr):
    line = next((l for l in stderr.splitlines() if l.startswith("specvm-stats ")), None)
    if line is None:
        raise RuntimeError("no specvm-stats line:\n" + stderr[-2000:])
    return json.loads(line.split(" ", 1)[1])


class Console:
    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0)
        self.seen = b""
        os.set_blocking(self.p.stdout.fileno(), False)

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def wait(self, marker, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.p.stdout.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                self.seen += chunk
                if marker.encode() in self.seen:
                    i = self.seen.index(marker.encode())
                    end = self.seen.find(b"\n", i)
                    if end >= 0:
                        line = self.seen[i:end].decode(errors="replace").strip()
                        self.seen = self.seen[end:]
                        return line
            elif self.p.poll() is not None:
                break
            else:
                time.sleep(0.05)
        raise RuntimeError(f"no {marker!r} within {timeout} s; last output: "
                           + self.seen[-500:].decode(errors="replace"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", default=os.path.join(ROOT, "target", "tmp", "linux-snapshot"))
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--specvm", metavar="PATH",
                    help="the specvm binary to measure (default: this tree's release build); "
                         "an older build here gives the before of an A/B")
    a = ap.parse_args()
    if a.specvm:
        global SPECVM
        SPECVM = os.path.abspath(a.specvm)
    if not os.path.isfile(os.path.join(a.snapshot, "state")):
        print(f"no snapshot in {a.snapshot}: run the Linux tests first "
              "(cargo test -p specvm-tests --test linux), or give --snapshot")
        return 1
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--quiet"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "-p", "specvm-tests", "--quiet"], cwd=ROOT, check=True)
    disk = os.path.join(ROOT, "images", "out", "disk.ext4")
    with tempfile.TemporaryDirectory(prefix="linux_spec.") as d:
        sock = os.path.join(d, "net.sock")
        cmd = [SPECVM, "run", "--restore", a.snapshot, "--net", f"socket={sock}",
               "--disk", f"path={disk}", "--stats"]
        # A socket card connects to a listener (SOCK_SEQPACKET): one that
        # takes the frames and drops them.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(sock)
        s.listen(1)

        def drain():
            try:
                conn, _ = s.accept()
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        threading.Thread(target=drain, daemon=True).start()
        c = Console(cmd)
        try:
            c.send("echo UP$((2*21))")
            c.wait("UP42", 600)
            t = time.monotonic()
            c.send(f"n=0; for i in $(seq {a.loops}); do if spec speculate; then spec abort; "
                   f"else n=$((n+1)); fi; done; echo ABORTED$((1+1))=$n")
            line = c.wait("ABORTED2=", 3600)
            abort_loop = (time.monotonic() - t) / a.loops
            if line != f"ABORTED2={a.loops}":
                raise RuntimeError(f"the guest says {line!r}")
            t = time.monotonic()
            c.send(f"for i in $(seq {a.loops}); do spec speculate; spec commit; done; "
                   f"echo COMMITTED$((1+1))=$?")
            c.wait("COMMITTED2=", 3600)
            commit_loop = (time.monotonic() - t) / a.loops
            c.send("poweroff -f")
            c.p.stdin.close()
            c.p.wait(timeout=600)
        finally:
            if c.p.poll() is None:
                c.p.kill()
                c.p.wait()
            s.close()
        linux = stats_of(c.p.stderr.read().decode(errors="replace"))
    mem = "512M"
    bare = subprocess.run([SPECVM, "run", "--bare", BENCH_GUEST, "--memory", mem, "--guest-arg",
                           str(1 | (a.loops << 32)), "--serial", "null", "--stats"],
                          capture_output=True, text=True, timeout=600)
    if bare.returncode != 0:
        raise RuntimeError(f"spec_bench exited {bare.returncode}: {bare.stderr[-1000:]}")
    bare = stats_of(bare.stderr)
    print(f"# Linux guest (2 vCPUs, {mem}, restored from {a.snapshot}), {a.loops} loops each; "
          "host-side µs from specvm --stats")
    print("| operation | Linux median | min | max | bare guest median (1 vCPU, 1 page) | Linux / bare |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for op in ("speculate", "abort", "commit"):
        l, b = linux.get(op), bare.get(op)
        if not l:
            continue
        bare_cell, ratio = "-", "-"
        if b:
            bare_cell = f"{b['median_us']:.0f}"
            ratio = f"{l['median_us'] / b['median_us']:.1f}x"
        print(f"| {op} | {l['median_us']:.0f} | {l['min_us']:.0f} | {l['max_us']:.0f} "
              f"| {bare_cell} | {ratio} |")
    print(f"guest wall time per loop (two exec()s of spec and the operations): "
          f"speculate+abort {abort_loop * 1e3:.0f} ms, speculate+commit {commit_loop * 1e3:.0f} ms")
    # Where the time goes: the phases the VMM times inside the operations
    # (see docs/benchmarks/checkpoint.md for what each one covers).
    phases = ("dirty.harvest", "checkpoint.memory", "checkpoint.state", "rollback.memory",
              "rollback.shadow_reset", "rollback.state")
    print("phase medians, Linux / bare (µs): " + ", ".join(
        f"{p} {linux[p]['median_us']:.0f} / "
        + (f"{bare[p]['median_us']:.0f}" if p in bare else "-")
        for p in phases if p in linux))
    return 0


if __name__ == "__main__":
    sys.exit(main())
