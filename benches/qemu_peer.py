#!/usr/bin/env python3
"""QEMU's checkpoint peer: time `savevm` and `loadvm` of an idle guest.

specvm's checkpoint/rollback times need something to be compared against in the
same benchmark run, on the same machine. The closest thing QEMU offers is the
pair of HMP commands `savevm TAG` (stop the VM, write its whole state, RAM
included, as an internal snapshot into a qcow2 image, resume) and `loadvm TAG`
(stop, read the state back, resume). This module starts one QEMU, sends those
commands through QMP's `human-monitor-command`, and times each one with
time.perf_counter() on the client side (QMP's own JSON round trip adds well
under a millisecond).

The guest runs no OS. SeaBIOS finds no boot device, prints "No bootable
device." and halts with interrupts enabled; the VM is still running under
`-accel kvm` when savevm is issued (this is checked with query-status and
query-kvm). SeaBIOS's debug port (0x402) goes to a file, so we know when it
has reached that idle state.

Two kinds of guest memory:
  zero    plain anonymous RAM (memory-backend-ram). Nearly every page is
          zero, and QEMU's RAM migration writes a zero page as a flag only,
          so this is QEMU's best case: the cost of scanning the RAM.
  filled  a private mapping (memory-backend-file, share=off) of a file filled
          with random bytes, so every page is non-zero and really has to be
          copied into the snapshot. This is the honest case for a guest that
          has used its memory.

Host facts this relies on (see /work/shared/design/HOST-KVM.md): /dev/kvm here
is kvm_pvm, with no VMX/SVM. `-cpu host` aborts on MSR 0x10a, so a named CPU
model is used (qemu64 with pni off, which this KVM does not offer).

Usage as a module (stdlib only, Python 3.11):

    from qemu_peer import measure, missing
    reason = missing()                       # None, or why there is no peer
    r = measure(1024, filled=True, reps=3)   # dict, or None if QEMU is unusable
                                             # (then last_error says why)

QEMU itself comes from benches/install-peer.sh, the one place that installs
the peer: missing() runs it once per process. It installs qemu-system-x86
and qemu-utils of one version (Debian 12's 7.2) when they are absent or do
not match, which needs root; QEMU_PEER_INSTALL=0 in the environment makes it
only check. When there is no usable peer, "QEMU peer missing: <reason>" is
printed, and the benchmarks write that line into their tables too.

CLI (zero guests by default; --filled for filled ones only, --both for both):

    python3 benches/qemu_peer.py --mem 256 1024 4096 [--filled | --both] [--reps 3]
                                 [--json out.json] [-v]

The first savevm/loadvm of a guest is much slower than the later ones (see
measure()); the table shows it apart.

Only one QEMU runs at a time. The QEMU process is killed by its PID and the
temporary directory (qcow2 image, memory file, sockets, logs) is removed in a
`finally` block, also on Ctrl-C and (from the CLI) SIGTERM. If this process
is SIGKILLed, QEMU still dies (PR_SET_PDEATHSIG) but the directory
($TMPDIR/qemu_peer.*) is left behind. Disk use: the memory file plus one
snapshot, about 2x the guest's RAM for a filled guest.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
# Installs (or, with --check, only looks for) qemu-system-x86_64 and qemu-img
# of one QEMU version; see the comment at its top for why a plain
# `apt-get install qemu-system-x86 qemu-utils` is not enough here.
INSTALL_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "install-peer.sh")
MISSING = "QEMU peer missing: "

# Why the last measure() returned None (None after a measure() that worked).
last_error: str | None = None
# missing()'s answer, computed once per process.
_missing_checked = False
_missing_reason: str | None = None

# A named CPU model that works with -accel kvm on kvm_pvm. `-cpu host` aborts
# (MSR 0x10a); qemu64 works, and pni=off only silences QEMU's warning that
# this KVM does not support SSE3.
DEFAULT_CPU = "qemu64,pni=off"

# Cache mode of the qcow2 image that holds the snapshots. With "unsafe",
# QEMU ignores flush requests, so savevm ends when the state is in the host's
# page cache instead of waiting for the disk: that measures QEMU's own work,
# which is what an in-memory checkpoint should be compared with.
# "writeback" (QEMU's default) adds the flush to stable storage.
DEFAULT_CACHE = "unsafe"

# A savevm slower than this ends the measurement of that guest size.
DEFAULT_SLOW_S = 60.0
# No single QMP command may take longer than this; past it QEMU is killed.
HARD_TIMEOUT_S = 600.0
# How long SeaBIOS may take to reach "No bootable device." (seconds of wall
# time; it is emulated, and took ~4 s at 256 MiB when this was written).
BIOS_IDLE_TIMEOUT_S = 120.0
BIOS_IDLE_MARK = b"No bootable device."

MIB = 1 << 20


class QMPError(RuntimeError):
    """QMP answered with an error, or HMP printed one."""


class QMP:
    """A minimal synchronous QMP client over a Unix socket.

    Events (STOP, RESUME, ...) that arrive while waiting for a reply are
    skipped and kept in `self.events`.
    """

    def __init__(self, path: str, proc: subprocess.Popen, timeout_s: float = 15.0):
        deadline = time.monotonic() + timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            if proc.poll() is not None:
                raise QMPError(f"QEMU exited with status {proc.returncode} before QMP was up")
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP socket at {path} after {timeout_s} s")
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self.stray: list[dict] = []  # replies that matched no command (expected: none)
        self._next_id = 0
        self.sock.settimeout(timeout_s)
        self.greeting = self._read()
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed (QEMU died?)")
        return json.loads(line)

    def command(self, name: str, timeout_s: float = 30.0, **arguments):
        """Execute one QMP command and return its "return" value."""
        self._next_id += 1
        msg = {"execute": name, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.settimeout(timeout_s)
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                self.stray.append(reply)  # not the answer to this command
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def hmp(self, command_line: str, timeout_s: float = 30.0) -> str:
        """Run an HMP command; return its output text."""
        out = self.command("human-monitor-command", timeout_s=timeout_s,
                           **{"command-line": command_line})
        if not isinstance(out, str):
            raise QMPError(f"{command_line}: unexpected reply {out!r}")
        return out

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def qemu_version(qemu: str) -> str:
    """'7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b2)' from `qemu --version`."""
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    first = out.splitlines()[0] if out else ""
    m = re.search(r"version\s+(.*)", first)
    return m.group(1).strip() if m else first.strip()


def _install_peer() -> str | None:
    """Run benches/install-peer.sh (with --check if QEMU_PEER_INSTALL=0);
    None if it reports a matching pair, else its one-line reason."""
    cmd = ["bash", INSTALL_PEER]
    if os.environ.get("QEMU_PEER_INSTALL", "1") == "0":
        cmd.append("--check")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{INSTALL_PEER} could not run: {e}"
    # Its progress (what it installed, the versions), and apt's output if
    # apt failed, go to our stderr; the benchmarks' stdout stays theirs.
    for line in (p.stdout + p.stderr).splitlines():
        if line and not line.startswith(MISSING):
            print(f"qemu_peer: {line}", file=sys.stderr)
    if p.returncode == 0:
        return None
    reasons = [l[len(MISSING):] for l in p.stderr.splitlines() if l.startswith(MISSING)]
    return reasons[-1] if reasons else f"{INSTALL_PEER} exited with status {p.returncode}"


def missing() -> str | None:
    """None when the QEMU peer can run here, else the reason, as one line.

    The first call runs benches/install-peer.sh (which may install QEMU) and
    prints "QEMU peer missing: <reason>" on stderr if there is no peer; later
    calls return the same answer without doing anything.
    """
    global _missing_checked, _missing_reason
    if not _missing_checked:
        reason = _install_peer()
        if reason is None and (shutil.which(QEMU) is None or shutil.which(QEMU_IMG) is None):
            reason = f"{QEMU} or {QEMU_IMG} is not in PATH ({os.environ.get('PATH', '')})"
        if reason is None and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            reason = "/dev/kvm is missing or not accessible (the peer runs QEMU with -accel kvm)"
        if reason is not None:
            print(f"qemu_peer: {MISSING}{reason}", file=sys.stderr)
        _missing_checked, _missing_reason = True, reason
    return _missing_reason


def _check_host() -> tuple[str, str] | None:
    """Paths of qemu-system-x86_64 and qemu-img, or None (the reason is in
    missing() and was printed)."""
    if missing() is not None:
        return None
    return shutil.which(QEMU), shutil.which(QEMU_IMG)


def _fill_file(path: str, mem_mib: int) -> None:
    """Write mem_mib MiB of random bytes to path.

    A 16 MiB block of os.urandom() is repeated: nothing on QEMU's savevm path
    (RAM migration without compression or XBZRLE, qcow2 without compression)
    looks for repeated content, only for zero pages, and this keeps the
    preparation of a 4 GiB guest to a few seconds.

    The file is fsync()ed, so that the kernel's writeback of these dirty
    pages does not run during (and slow down) the timed commands.
    """
    block = os.urandom(16 * MIB)
    left = mem_mib * MIB
    with open(path, "wb") as f:
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _vm_state_mib(qmp: QMP, tag: str) -> float | None:
    """The VM SIZE column of `info snapshots` for tag, in MiB."""
    text = qmp.hmp("info snapshots")
    for line in text.splitlines():
        cols = line.split()
        # ID TAG VM-SIZE UNIT DATE TIME VM-CLOCK [ICOUNT]
        if len(cols) >= 4 and cols[1] == tag:
            try:
                value = float(cols[2])
            except ValueError:
                return None
            scale = {"B": 1 / MIB, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "TiB": 1024 ** 2}
            return round(value * scale.get(cols[3], float("nan")), 2)
    return None


def _die_with_parent() -> None:
    """In the QEMU child, before exec: ask Linux to SIGKILL it if this Python
    process dies without running its `finally` blocks (e.g. SIGKILL)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _wait_bios_idle(log_path: str, proc: subprocess.Popen, timeout_s: float) -> float | None:
    """Wait until SeaBIOS reports no boot device; seconds taken, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            return None
        try:
            with open(log_path, "rb") as f:
                if BIOS_IDLE_MARK in f.read():
                    return time.monotonic() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return None


def qemu_command(qemu: str, tmp: str, mem_mib: int, filled: bool,
                 cpu: str = DEFAULT_CPU, cache: str = DEFAULT_CACHE) -> list[str]:
    """The QEMU command line for one guest, with its files in tmp."""
    if filled:
        backend = (f"memory-backend-file,id=mem0,size={mem_mib}M,"
                   f"mem-path={os.path.join(tmp, 'mem.bin')},share=off")
    else:
        backend = f"memory-backend-ram,id=mem0,size={mem_mib}M"
    return [
        qemu,
        "-accel", "kvm",
        "-machine", "pc,memory-backend=mem0",
        "-cpu", cpu,
        "-smp", "1",
        "-m", f"{mem_mib}M",
        "-object", backend,
        "-nodefaults", "-nographic", "-display", "none",
        "-serial", "none", "-monitor", "none",
        "-qmp", f"unix:{os.path.join(tmp, 'qmp.sock')},server=on,wait=off",
        # The qcow2 image that receives the internal snapshots. It is not
        # attached to any guest device: savevm only needs a writable block
        # node that supports snapshots.
        "-drive", f"file={os.path.join(tmp, 'disk.qcow2')},if=none,id=d0,"
                  f"format=qcow2,cache={cache}",
        # SeaBIOS's debug output, to see when it has gone idle.
        "-chardev", f"file,id=dbg,path={os.path.join(tmp, 'bios.log')}",
        "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
    ]


def measure(mem_mib: int, filled: bool, reps: int = 3, *,
            cpu: str = DEFAULT_CPU, cache: str = DEFAULT_CACHE,
            slow_s: float = DEFAULT_SLOW_S, tmp_parent: str | None = None,
            verbose: bool = False, data_disk: tuple[int, int] | None = None) -> dict | None:
    """Time `reps` savevm/loadvm pairs of an idle guest of mem_mib MiB.

    Returns {"mem_mib", "filled", "savevm_ms": [...], "loadvm_ms": [...],
    "qemu_version"} plus some context ("vm_state_mib": snapshot sizes as QEMU
    reports them, "cpu", "cache", "bios_idle_s", "note"), or None (with the
    reason printed on stderr and kept in `last_error`) when QEMU is missing
    or unusable.

    Each rep is: savevm pN (timed), loadvm pN (timed), delvm pN (not timed;
    keeps the qcow2 image from growing by a guest's RAM per rep). If one
    savevm takes longer than slow_s, no more reps are made for this guest and
    "note" says so; the lists may then be shorter than reps.

    Element 0 of each list is the cold case and is usually several times
    slower than the rest: it is the first time QEMU reads the guest's RAM
    mapping, the qcow2 file grows to hold the state (later reps reuse the
    clusters that delvm freed), and, for a filled guest, loadvm takes a
    copy-on-write fault on every page of the private file mapping.

    data_disk=(size_mib, written_kib) adds a second qcow2 image of size_mib,
    with written_kib KiB of data written at its start by qemu-io before QEMU
    starts: savevm snapshots every writable image, so this is the disk +
    memory checkpoint (benches/disk_io.py compares it with specvm's).
    """
    global last_error
    last_error = None
    host = _check_host()
    if host is None:
        last_error = f"{MISSING}{missing()}"
        return None
    qemu, qemu_img = host
    version = qemu_version(qemu)

    def say(msg: str) -> None:
        if verbose:
            print(f"qemu_peer: [{mem_mib} MiB {'filled' if filled else 'zero'}] {msg}",
                  file=sys.stderr, flush=True)

    tmp = tempfile.mkdtemp(prefix="qemu_peer.", dir=tmp_parent)
    proc: subprocess.Popen | None = None
    qmp: QMP | None = None
    log = None
    try:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2",
                        os.path.join(tmp, "disk.qcow2"), "64M"],
                       check=True, capture_output=True, timeout=60)
        if filled:
            t = time.perf_counter()
            _fill_file(os.path.join(tmp, "mem.bin"), mem_mib)
            say(f"memory file written in {time.perf_counter() - t:.1f} s")

        cmd = qemu_command(qemu, tmp, mem_mib, filled, cpu, cache)
        if data_disk is not None:
            size_mib, written_kib = data_disk
            data = os.path.join(tmp, "data.qcow2")
            subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", data, f"{size_mib}M"],
                           check=True, capture_output=True, timeout=60)
            if written_kib:
                qemu_io = os.path.join(os.path.dirname(qemu_img), "qemu-io")
                subprocess.run([qemu_io, "-f", "qcow2", "-c",
                                f"write -P 0x5a 0 {written_kib}k", data],
                               check=True, capture_output=True, timeout=600)
            cmd += ["-drive", f"file={data},if=none,id=d1,format=qcow2,cache={cache}"]
        log = open(os.path.join(tmp, "qemu.log"), "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        say(f"started QEMU, PID {proc.pid}")
        try:
            qmp = QMP(os.path.join(tmp, "qmp.sock"), proc)
            kvm = qmp.command("query-kvm")
            if not (kvm.get("enabled") and kvm.get("present")):
                raise QMPError(f"KVM not in use: {kvm}")
        except (QMPError, OSError) as e:
            log.flush()
            with open(os.path.join(tmp, "qemu.log"), "rb") as f:
                out = f.read().decode(errors="replace").strip()
            print(f"qemu_peer: QEMU is unusable here: {e}\n  command: {' '.join(cmd)}"
                  + (f"\n  QEMU said: {out}" if out else ""), file=sys.stderr)
            last_error = f"QEMU is unusable here: {e}"
            return None

        # Let SeaBIOS reach its idle halt before the first savevm.
        bios_idle_s = _wait_bios_idle(os.path.join(tmp, "bios.log"), proc,
                                      BIOS_IDLE_TIMEOUT_S)
        say(f"SeaBIOS idle after {bios_idle_s} s")

        result = {
            "mem_mib": mem_mib,
            "filled": filled,
            "savevm_ms": [],
            "loadvm_ms": [],
            "qemu_version": version,
            "vm_state_mib": [],
            "cpu": cpu,
            "cache": cache,
            "bios_idle_s": None if bios_idle_s is None else round(bios_idle_s, 2),
            "note": "" if bios_idle_s is not None else
                    "SeaBIOS did not report idle in time; measured anyway",
        }

        for rep in range(reps):
            tag = f"p{rep}"
            status = qmp.command("query-status")
            if status.get("status") != "running":
                raise QMPError(f"VM not running before savevm: {status}")

            t = time.perf_counter()
            out = qmp.hmp(f"savevm {tag}", timeout_s=HARD_TIMEOUT_S)
            save_ms = (time.perf_counter() - t) * 1e3
            if out.strip():  # HMP prints nothing on success
                raise QMPError(f"savevm {tag}: {out.strip()}")
            result["savevm_ms"].append(round(save_ms, 2))
            result["vm_state_mib"].append(_vm_state_mib(qmp, tag))
            say(f"savevm {tag}: {save_ms:.1f} ms")

            t = time.perf_counter()
            out = qmp.hmp(f"loadvm {tag}", timeout_s=HARD_TIMEOUT_S)
            load_ms = (time.perf_counter() - t) * 1e3
            if out.strip():
                raise QMPError(f"loadvm {tag}: {out.strip()}")
            result["loadvm_ms"].append(round(load_ms, 2))
            say(f"loadvm {tag}: {load_ms:.1f} ms")

            status = qmp.command("query-status")
            if status.get("status") != "running":
                raise QMPError(f"VM not running after loadvm: {status}")
            out = qmp.hmp(f"delvm {tag}", timeout_s=HARD_TIMEOUT_S)
            if out.strip():
                raise QMPError(f"delvm {tag}: {out.strip()}")

            if save_ms > slow_s * 1e3:
                result["note"] = (f"savevm took {save_ms / 1e3:.1f} s > {slow_s:g} s; "
                                  f"stopped after {rep + 1} rep(s)")
                break
        return result
    except (QMPError, OSError, subprocess.SubprocessError, ValueError) as e:
        # socket.timeout is an OSError: a command past HARD_TIMEOUT_S ends here.
        print(f"qemu_peer: measurement of {mem_mib} MiB "
              f"({'filled' if filled else 'zero'}) failed: {e}", file=sys.stderr)
        last_error = f"measurement failed: {e}"
        return None
    finally:
        if qmp is not None:
            qmp.close()
        if proc is not None:
            # Kill exactly the QEMU we started, by its PID.
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if log is not None:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _first(values: list[float]) -> str:
    return f"{values[0]:.1f}" if values else "-"


def _later(values: list[float]) -> str:
    """'median (min-max)' of the reps after the first one."""
    rest = values[1:]
    if not rest:
        return "-"
    med = statistics.median(rest)
    if len(rest) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(rest):.1f}-{max(rest):.1f})"


def print_table(results: list[dict]) -> None:
    """One row per guest. The first rep is shown apart from the others: it
    pays one-time costs (QEMU's first touch of the guest RAM mapping, the
    growth of the qcow2 file, the guest's copy-on-write of its file-backed
    pages in loadvm), while the later reps reuse what the first allocated."""
    rows = [("MiB", "guest RAM", "snapshot MiB",
             "savevm ms: 1st", "later: median (min-max)",
             "loadvm ms: 1st", "later: median (min-max)", "note")]
    for r in results:
        sizes = [s for s in r.get("vm_state_mib", []) if s is not None]
        rows.append((
            str(r["mem_mib"]),
            "filled" if r["filled"] else "zero",
            f"{max(sizes):.1f}" if sizes else "?",
            _first(r["savevm_ms"]), _later(r["savevm_ms"]),
            _first(r["loadvm_ms"]), _later(r["loadvm_ms"]),
            r.get("note", ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time QEMU savevm/loadvm of an idle guest (specvm's checkpoint peer).")
    ap.add_argument("--mem", type=int, nargs="+", default=[256, 1024, 4096],
                    metavar="MIB", help="guest memory sizes in MiB (default: 256 1024 4096)")
    fill = ap.add_mutually_exclusive_group()
    fill.add_argument("--filled", action="store_true",
                      help="only guests whose every page is non-zero (random)")
    fill.add_argument("--both", action="store_true",
                      help="measure zero and filled guests")
    ap.add_argument("--reps", type=int, default=3, help="savevm/loadvm pairs per guest")
    ap.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU -cpu model (default {DEFAULT_CPU})")
    ap.add_argument("--cache", default=DEFAULT_CACHE,
                    choices=["unsafe", "writeback", "none", "directsync", "writethrough"],
                    help=f"cache mode of the snapshot qcow2 (default {DEFAULT_CACHE})")
    ap.add_argument("--slow", type=float, default=DEFAULT_SLOW_S, metavar="S",
                    help="stop a size after a savevm slower than S seconds "
                         "(and skip larger sizes of the same kind)")
    ap.add_argument("--tmpdir", default=None,
                    help="parent of the temporary directory (needs room for the "
                         "memory file and the snapshot: ~2x the largest filled guest)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)

    # Turn SIGTERM (e.g. a harness's timeout) into SystemExit, so that the
    # `finally` in measure() kills QEMU and removes the temporary directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    if missing() is not None:
        # No peer (QEMU not installable here, no /dev/kvm): skipped, not
        # failed; "QEMU peer missing: <reason>" is printed on stderr.
        return 0
    kinds = [False, True] if args.both else [args.filled]
    results = []
    for filled in kinds:
        for mem in sorted(args.mem):
            r = measure(mem, filled, args.reps, cpu=args.cpu, cache=args.cache,
                        slow_s=args.slow, tmp_parent=args.tmpdir, verbose=args.verbose)
            if r is None:
                continue  # the reason is printed
            results.append(r)
            if r["savevm_ms"] and max(r["savevm_ms"]) > args.slow * 1e3:
                bigger = [m for m in args.mem if m > mem]
                if bigger:
                    print(f"qemu_peer: skipping {bigger} MiB "
                          f"({'filled' if filled else 'zero'}): {mem} MiB was already too slow",
                          file=sys.stderr)
                break

    if results:
        print(f"QEMU {results[0]['qemu_version']}, -cpu {args.cpu}, "
              f"snapshot qcow2 cache={args.cache}")
        print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
