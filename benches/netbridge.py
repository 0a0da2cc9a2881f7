#!/usr/bin/env python3
"""netbridge benchmark: what speculation tags, joins and outcome messages
cost on the network path, and the bridge's throughput next to a plain Linux
bridge, all in one run.

    python3 benches/netbridge.py [--quick] [--only codec,join,fanout,throughput]
                                 [--no-build] [--json out.json] [--md out.md]

1. codec: `netbridge-bench codec` times the codec calls one packet meets
   (the sending VMM's retag, the bridge's tag read, the receiving VMM's
   parse_tags and strip) per frame, for an untagged and a tagged frame.
2. join: one real VM (bare guest `net_echo`, 128 MiB, which sends every
   frame it gets back) on a netbridge, and a fake port (this script, VM 9).
   The round trip (frame written to the bridge → its echo read back) is
   compared, round by round, for an untagged frame, a frame tagged with a
   new speculation of VM 9 (the VMM pauses the VM, takes a checkpoint and
   joins before delivery) and a frame tagged with an id the VM already
   holds. After each round VM 9 commits, and the script waits for the
   VM's ack. The VMM's `joined` log line (wall clock) gives a second view.
3. fanout: fake ports only: an owner and N members (N = 1, 4, 16) that
   joined one speculation; the owner sends `resolved` and the script times
   until every member has its `decided`, and until the bridge's event
   stream shows every member's `acked` (members ack at once). This is the
   bridge's fan-out plus this script's reading of N sockets, not a VMM's
   rollback (docs/benchmarks/checkpoint.md has that).
4. throughput: `netbridge-bench pump-bridge` (two ports, one sender, one
   receiver, untagged or tagged) against `netbridge-bench pump-tap`: two
   TAPs on a Linux bridge in a network namespace of our own
   (specvm-bench-<pid>, deleted at the end), same frame size and duration.

Every load loop is bounded in time (at most 3 s) and in frames. Traffic
stays on Unix sockets and inside the namespace. Needs root for the
namespace and /dev/kvm for the join test; what cannot run is skipped with
the reason.
"""

import argparse
import datetime
import json
import os
import platform
import queue
import re
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "target")
REL = os.path.join(TARGET, "release")
NETBRIDGE = os.path.join(REL, "netbridge")
SPECVM = os.path.join(REL, "specvm")
BENCH = os.path.join(REL, "netbridge-bench")
NET_ECHO = os.path.join(TARGET, "bare-guests", "net_echo")

KIND_FRAME = 0
KIND_CONTROL = 1
IPOPT_SPEC = 0x9E
FAKE_MAC = bytes([0x02, 0x6E, 0x62, 0x62, 0x00, 0x09])
FAKE_VM = 9
GOALS = {"tag_us": 2.0, "join_ms": 1.0, "fanout16_ms": 5.0, "throughput_ratio": 2.0}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build():
    log("building: cargo build --release --workspace")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=ROOT, check=True)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def summary(v):
    return {"n": len(v), "median": statistics.median(v), "p90": pct(v, 90), "min": min(v), "max": max(v)}


# ------------------------------------------------------------------ frames

def ip_checksum(h):
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp_frame(payload, tag_ids=(), dst=b"\xff" * 6, src=FAKE_MAC, port=7777):
    """A UDP/IPv4 frame to `port`, tagged with IPOPT_SPEC when `tag_ids`
    (64-bit ids) is not empty, in the format of docs/wire-format.md."""
    opts = b""
    if tag_ids:
        opts = bytes([IPOPT_SPEC, 4 + 8 * len(tag_ids), 1, len(tag_ids)])
        opts += b"".join(struct.pack("!Q", i) for i in tag_ids)
    ihl = (20 + len(opts)) // 4
    udp = struct.pack("!HHHH", port, port, 8 + len(payload), 0) + payload
    total = ihl * 4 + len(udp)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, 0, 64, 17, 0,
                      bytes([10, 0, 0, src[5]]), bytes([10, 0, 0, 255])) + opts
    hdr = hdr[:10] + struct.pack("!H", ip_checksum(hdr)) + hdr[12:]
    return dst + src + b"\x08\x00" + hdr + udp


# ------------------------------------------------------------ bridge & ports

class Bridge:
    """A netbridge process in a temporary directory, killed on exit."""

    def __init__(self, tmp, name):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "br.sock")
        self.events = os.path.join(self.dir, "ev.sock")
        with open(os.path.join(self.dir, "stderr"), "w") as err:
            self.proc = subprocess.Popen([NETBRIDGE, "--listen", self.sock, "--events", self.events, "--quiet"],
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.sock) and os.path.exists(self.events)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("netbridge did not start")
            time.sleep(0.01)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Port:
    """A fake VMM port: the protocol of docs/netbridge.md."""

    def __init__(self, path, vm, speculative=True):
        self.vm = vm
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.pending = []
        self.send_ctl({"type": "hello", "vm": vm, "speculative": speculative})
        kind, msg = self.recv(5)
        if kind != KIND_CONTROL or msg.get("type") != "welcome":
            raise RuntimeError(f"VM {vm}: expected a welcome, got {msg!r}")
        self.next_seq = msg["next_seq"]
        self.s.setblocking(False)

    def send_ctl(self, obj):
        body = bytes([KIND_CONTROL]) + json.dumps(obj, separators=(",", ":")).encode()
        self.s.sendall(struct.pack("<I", len(body)) + body)

    def send_frame(self, frame):
        body = bytes([KIND_FRAME]) + frame
        self.s.sendall(struct.pack("<I", len(body)) + body)

    def take(self):
        """Complete messages received so far: (kind, frame bytes or dict)."""
        out, self.pending = self.pending, []
        while len(self.buf) >= 4:
            n = struct.unpack_from("<I", self.buf)[0]
            if len(self.buf) < 4 + n:
                break
            body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
            if body[0] == KIND_CONTROL:
                out.append((KIND_CONTROL, json.loads(body[1:])))
            else:
                out.append((KIND_FRAME, body[1:]))
        return out

    def feed(self):
        """Reads what is there (non-blocking socket); False on EOF."""
        try:
            d = self.s.recv(1 << 16)
        except BlockingIOError:
            return True
        if not d:
            return False
        self.buf += d
        return True

    def recv(self, timeout):
        """The next message, waiting up to `timeout` (blocking socket)."""
        self.s.settimeout(timeout)
        while True:
            m = self.take()
            if m:
                self.pending = m[1:]
                return m[0]
            d = self.s.recv(1 << 16)
            if not d:
                raise RuntimeError(f"VM {self.vm}: the bridge closed the port")
            self.buf += d

    def close(self):
        self.s.close()


class Events:
    """A client of the bridge's --events socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.s.setblocking(False)
        self.buf = b""
        self.seen = []

    def feed(self):
        try:
            d = self.s.recv(1 << 16)
        except BlockingIOError:
            return []
        self.buf += d
        lines = self.buf.split(b"\n")
        self.buf = lines.pop()
        evs = [json.loads(l) for l in lines if l.strip()]
        self.seen.extend(evs)
        return evs

    def wait(self, event, ident, count, timeout=5.0):
        """Waits until `count` events `event` for id `ident` were seen."""
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.s, selectors.EVENT_READ)
        try:
            while True:
                n = sum(1 for e in self.seen if e.get("event") == event and e.get("id") == ident)
                if n >= count:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out waiting for {count} {event} events of {ident}")
                if sel.select(left):
                    self.feed()
        finally:
            sel.close()

    def close(self):
        self.s.close()


def ident(i):
    return f"{i >> 32}:{i & 0xFFFFFFFF}"


# -------------------------------------------------------------------- codec

def bench_codec(quick, _tmp):
    iters = 20_000 if quick else 200_000
    out = subprocess.run([BENCH, "codec", "--iters", str(iters)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    res = {}
    for size in (64, 1474):
        def ns(op, ids, key="ns_median"):
            return next(r[key] for r in rows if r["op"] == op and r["ids"] == ids and r["size"] == size)

        path = {}
        for key in ("ns_median", "ns_min"):
            # The path of one packet through the VMMs and the bridge:
            # sender's retag, bridge's tag read, receiver's parse (+ strip).
            untagged = ns("retag", 0, key) + ns("bridge_read", 0, key) + ns("parse_tags", 0, key)
            tagged = ns("retag", 1, key) + ns("bridge_read", 1, key) + ns("parse_tags", 1, key) + ns("strip", 1, key)
            tagged4 = ns("retag", 4, key) + ns("bridge_read", 4, key) + ns("parse_tags", 4, key) + ns("strip", 4, key)
            path[key] = {"untagged": untagged, "tagged1": tagged, "tagged4": tagged4,
                         "added1": tagged - untagged, "added4": tagged4 - untagged}
        res[size] = {"rows": [r for r in rows if r["size"] == size], "path": path}
    return res


# --------------------------------------------------------------------- join

class Console:
    """Lines of a process's stdout, each with the time it was read."""

    def __init__(self, stream):
        self.q = queue.Queue()
        self.t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.t.start()

    def _run(self, stream):
        fd = stream.fileno()
        buf = b""
        while True:
            d = os.read(fd, 65536)
            now = time.perf_counter()
            if not d:
                self.q.put((now, None))
                return
            buf += d
            *lines, buf = buf.split(b"\n")
            for l in lines:
                self.q.put((now, l.decode(errors="replace")))

    def wait_for_prefix(self, text, timeout):
        """The first line starting with `text`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"timed out waiting for {text!r} on the guest console")
            try:
                _, line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"the VM exited while waiting for {text!r}")
            if line.startswith(text):
                return line


def bench_join(quick, tmp):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return {"skipped": "no usable /dev/kvm"}
    if not os.path.exists(NET_ECHO):
        return {"skipped": f"{NET_ECHO} missing (build the workspace)"}
    reps = 20 if quick else 60
    lat = {"untagged": [], "join": [], "joined": []}
    sent_wall = {}
    with Bridge(tmp, "join") as br:
        ev = Events(br.events)
        vm_log = open(os.path.join(tmp, "join-vm.log"), "w")
        frames = 1 + 3 * reps
        vm = subprocess.Popen([SPECVM, "--log-level", "info", "run", "--bare", NET_ECHO, "--memory", "128M",
                               "--guest-arg", str(frames), "--id", "2", "--net", f"bridge={br.sock}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=vm_log)
        try:
            con = Console(vm.stdout)
            line = con.wait_for_prefix("net_echo: mac ", 30)
            vm_mac = bytes(int(x, 16) for x in line.split()[2].split(":"))
            fake = Port(br.sock, FAKE_VM)
            sel = selectors.DefaultSelector()
            sel.register(fake.s, selectors.EVENT_READ)

            def round_trip(payload, tags=()):
                """µs from writing the frame to the bridge to reading the
                guest's echo of it."""
                marker = payload.encode()
                frame = udp_frame(marker, tags, dst=vm_mac)
                if tags:
                    sent_wall.setdefault(ident(tags[0]), time.time())
                t0 = time.perf_counter()
                fake.send_frame(frame)
                deadline = t0 + 10
                while True:
                    for kind, body in fake.take():
                        if kind == KIND_FRAME and body[6:12] == vm_mac and body.endswith(marker):
                            return (time.perf_counter() - t0) * 1e6
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise RuntimeError(f"no echo of {payload}")
                    if sel.select(left) and not fake.feed():
                        raise RuntimeError("the bridge closed the fake port")

            round_trip("warmup")
            for i in range(reps):
                sid = (FAKE_VM << 32) | (fake.next_seq + i)
                fake.send_ctl({"type": "started", "id": sid})
                ev.wait("started", ident(sid), 1)
                # The untagged frame goes first in even rounds, last in
                # odd ones, so that neither position favours it.
                if i % 2 == 0:
                    time.sleep(0.005)
                    lat["untagged"].append(round_trip(f"u{i:04}"))
                time.sleep(0.005)
                lat["join"].append(round_trip(f"j{i:04}", [sid]))
                time.sleep(0.005)
                lat["joined"].append(round_trip(f"k{i:04}", [sid]))
                if i % 2 == 1:
                    time.sleep(0.005)
                    lat["untagged"].append(round_trip(f"u{i:04}"))
                ev.wait("joined", ident(sid), 1)
                fake.send_ctl({"type": "resolved", "id": sid, "outcome": "commit"})
                ev.wait("acked", ident(sid), 1)
            con.wait_for_prefix(f"net_echo: echoed {frames} frames", 10)
            vm.wait(10)
            fake.close()
            ev.close()
        finally:
            if vm.poll() is None:
                vm.kill()
                vm.wait()
            vm_log.close()
    # The VMM logs `joined` (wall clock, µs) once the checkpoint is taken
    # and the entry pushed, just before it resumes the VM and delivers.
    to_log = []
    joins_logged = 0
    for l in open(os.path.join(tmp, "join-vm.log")):
        m = re.match(r"(\S+Z)\s+INFO .*\bjoined id=(\d+:\d+)", l)
        if m:
            joins_logged += 1
            t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            if m.group(2) in sent_wall:
                to_log.append((t - sent_wall[m.group(2)]) * 1e6)
    res = {k: summary(v) for k, v in lat.items()}
    res["joins_logged"] = joins_logged
    res["reps"] = reps
    if to_log:
        res["send_to_joined_log"] = summary(to_log)
    # Paired by round: each join against the untagged frame of its round.
    res["join_added"] = summary([j - u for j, u in zip(lat["join"], lat["untagged"])])
    res["tag_added"] = summary([k - u for k, u in zip(lat["joined"], lat["untagged"])])
    return res


# ------------------------------------------------------------------ fan-out

def bench_fanout(quick, tmp):
    reps = 20 if quick else 100
    res = {}
    with Bridge(tmp, "fanout") as br:
        ev = Events(br.events)
        owner = Port(br.sock, 100)
        members = [Port(br.sock, 200 + k) for k in range(16)]
        seq = owner.next_seq
        for n in (1, 4, 16):
            for outcome in ("commit", "abort"):
                decided, acked = [], []
                for _ in range(reps):
                    sid = (100 << 32) | seq
                    seq += 1
                    owner.send_ctl({"type": "started", "id": sid})
                    for m in members[:n]:
                        m.send_ctl({"type": "joined", "ids": [sid]})
                    ev.wait("joined", ident(sid), n)
                    d, a = fanout_once(owner, members[:n], ev, sid, outcome)
                    decided.append(d)
                    acked.append(a)
                res[f"{n}/{outcome}"] = {"n": n, "outcome": outcome, "decided": summary(decided),
                                         "acked": summary(acked)}
        for p in [owner, *members]:
            p.close()
        ev.close()
    return res


def fanout_once(owner, members, ev, sid, outcome, timeout=5.0):
    """Times one outcome: ms until every member has `decided`, and until
    the event stream shows every member's ack."""
    sel = selectors.DefaultSelector()
    for m in members:
        sel.register(m.s, selectors.EVENT_READ, m)
    sel.register(ev.s, selectors.EVENT_READ, ev)
    name = ident(sid)
    waiting = set(range(len(members)))
    index = {id(m): k for k, m in enumerate(members)}
    acks = 0
    t_decided = None
    t0 = time.perf_counter()
    owner.send_ctl({"type": "resolved", "id": sid, "outcome": outcome})
    try:
        while waiting or acks < len(members):
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"fan-out of {name} timed out")
            for key, _ in sel.select(timeout):
                obj = key.data
                if obj is ev:
                    acks += sum(1 for e in ev.feed() if e.get("event") == "acked" and e.get("id") == name)
                    continue
                obj.feed()
                for kind, msg in obj.take():
                    if kind == KIND_CONTROL and msg.get("type") == "decided" and msg.get("id") == sid:
                        obj.send_ctl({"type": "ack", "seq": msg["seq"]})
                        waiting.discard(index[id(obj)])
                        if not waiting and t_decided is None:
                            t_decided = time.perf_counter()
    finally:
        sel.close()
    t_acked = time.perf_counter()
    return (t_decided - t0) * 1e3, (t_acked - t0) * 1e3


# --------------------------------------------------------------- throughput

def ns_run(ns, *cmd, check=True):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True,
                          timeout=60)


def proc_cpu(pid):
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def setup_ns(ns):
    """Our namespace: a Linux bridge `nbb-br` with two TAPs on it, no IPv6
    (no stray router solicitations), no addresses, nothing routed."""
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    ns_run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    ip = ["ip", "-n", ns, "link"]
    subprocess.run([*ip, "add", "nbb-br", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
                   check=True, capture_output=True)
    for t in ("nbb-tx", "nbb-rx"):
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", t, "mode", "tap"], check=True, capture_output=True)
        subprocess.run([*ip, "set", t, "master", "nbb-br", "up"], check=True, capture_output=True)
    subprocess.run([*ip, "set", "nbb-br", "up"], check=True, capture_output=True)


def bench_throughput(quick, tmp):
    secs = 1.0 if quick else 1.5
    rounds = 1 if quick else 5
    sizes = (64, 1474)
    max_frames = 3_000_000
    res = {"secs": secs, "rounds": rounds, "runs": []}
    have_ns = os.geteuid() == 0 and shutil.which("ip") and os.path.exists("/dev/net/tun")
    ns = f"specvm-bench-{os.getpid()}"
    created = False
    try:
        if have_ns:
            try:
                setup_ns(ns)
                created = True
            except subprocess.CalledProcessError as e:
                created = True  # partly: the finally below removes what exists
                have_ns = False
                res["linux_skipped"] = f"{' '.join(e.cmd)}: {(e.stderr or b'').strip()!r}"
        else:
            res["linux_skipped"] = "needs root, ip(8) and /dev/net/tun"

        load = ["--secs", str(secs), "--max-frames", str(max_frames)]
        for r in range(rounds):
            for size in sizes:
                kinds = ["netbridge-untagged", "netbridge-tagged", "linux-bridge-tap"]
                # A different order each round, so no kind always goes first.
                for kind in kinds[r % 3:] + kinds[:r % 3]:
                    if kind.startswith("netbridge"):
                        with Bridge(tmp, f"tp-{r}-{size}-{kind}") as br:
                            cmd = [BENCH, "pump-bridge", "--sock", br.sock, "--size", str(size), *load]
                            if kind.endswith("tagged") and not kind.endswith("untagged"):
                                cmd.append("--tagged")
                            cpu0 = proc_cpu(br.proc.pid)
                            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
                            cpu = proc_cpu(br.proc.pid) - cpu0
                    elif have_ns:
                        out = ns_run(ns, BENCH, "pump-tap", "--tx", "nbb-tx", "--rx", "nbb-rx",
                                     "--size", str(size), *load).stdout
                    else:
                        continue
                    row = json.loads(out.strip().splitlines()[-1])
                    row["round"] = r
                    if kind.startswith("netbridge") and row["received"]:
                        row["bridge_cpu_us_per_frame"] = cpu * 1e6 / row["received"]
                    res["runs"].append(row)
                    log(f"  {kind:19} {size:5} B: {row['rx_fps']:>9.0f} frames/s "
                        f"({row['received']}/{row['sent']} received)")
    finally:
        if created:
            for t in ("nbb-tx", "nbb-rx", "nbb-br"):
                subprocess.run(["ip", "-n", ns, "link", "del", t], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    res["median"] = {}
    res["bridge_cpu"] = {}
    for size in sizes:
        for kind in ("netbridge-untagged", "netbridge-tagged"):
            v = [x["bridge_cpu_us_per_frame"] for x in res["runs"]
                 if x["kind"] == kind and x["size"] == size and "bridge_cpu_us_per_frame" in x]
            if v:
                res["bridge_cpu"][f"{kind}/{size}"] = statistics.median(v)
    for size in sizes:
        for kind in ("netbridge-untagged", "netbridge-tagged", "linux-bridge-tap"):
            v = [x["rx_fps"] for x in res["runs"] if x["kind"] == kind and x["size"] == size]
            if v:
                res["median"][f"{kind}/{size}"] = statistics.median(v)
    return res


# ------------------------------------------------------------------- report

def fmt_us(x):
    return f"{x:.2f}"


def render(all_results, args, started, load):
    lines = []
    add = lines.append
    results = {k: v for k, v in all_results.items() if "failed" not in v}
    add(f"Command: `python3 benches/netbridge.py{' --quick' if args.quick else ''}`, "
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()} ({os.cpu_count()} CPUs), "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after.")
    add("")
    c = results.get("codec")
    if c:
        add("### 1. Tagging: codec cost per frame (ns; median of 9 batches, lowest in brackets)")
        add("")
        add("| where | call | ids | 64 B | 1474 B |")
        add("|---|---|---|---|---|")
        for r in c[64]["rows"]:
            op, ids = r["op"], r["ids"]
            cells = []
            for size in (64, 1474):
                x = next(y for y in c[size]["rows"] if y["op"] == op and y["ids"] == ids)
                cells.append(f"{x['ns_median']:.0f} ({x['ns_min']:.0f})")
            add(f"| {r['what']} | `{op}` | {ids} | {cells[0]} | {cells[1]} |")
        for label, key in (("untagged", "untagged"), ("tagged, 1 id", "tagged1"), ("tagged, 4 ids", "tagged4"),
                           ("**added by a 1-id tag**", "added1"), ("**added by a 4-id tag**", "added4")):
            cells = [f"{c[s]['path']['ns_median'][key]:.0f} ({c[s]['path']['ns_min'][key]:.0f})" for s in (64, 1474)]
            add(f"| path total: {label} | | | {cells[0]} | {cells[1]} |")
        add("")
    j = results.get("join")
    if j:
        add("### 2. Join: round trip fake port → bridge → VM (net_echo) → bridge → fake port (µs)")
        add("")
        if "skipped" in j:
            add(f"Skipped: {j['skipped']}")
        else:
            add("| frame | n | median | p90 | min | max |")
            add("|---|---|---|---|---|---|")
            for k, label in (("untagged", "untagged"), ("join", "tagged, new id (pause + checkpoint + join)"),
                             ("joined", "tagged, id already held")):
                s = j[k]
                add(f"| {label} | {s['n']} | {s['median']:.0f} | {s['p90']:.0f} | {s['min']:.0f} | {s['max']:.0f} |")
            for k, label in (("join_added", "**added by a join** (join − untagged, same round)"),
                             ("tag_added", "added by a tag already joined (same round)")):
                s = j[k]
                add(f"| {label} | {s['n']} | {s['median']:.0f} | {s['p90']:.0f} | {s['min']:.0f} | {s['max']:.0f} |")
            add("")
            add(f"The VM logged {j['joins_logged']} joins for {j['reps']} rounds.")
            if "send_to_joined_log" in j:
                s = j["send_to_joined_log"]
                add(f"From the frame's send to the VMM's `joined` log line (bridge hop, pause, checkpoint; "
                    f"wall clock): median {s['median']:.0f} µs, p90 {s['p90']:.0f} µs.")
        add("")
    f = results.get("fanout")
    if f:
        add("### 3. Outcome propagation: owner's `resolved` → every member's `decided` (ms)")
        add("")
        add("| members | outcome | decided median | p90 | max | all acked (event stream) median | p90 |")
        add("|---|---|---|---|---|---|---|")
        for v in f.values():
            d, a = v["decided"], v["acked"]
            add(f"| {v['n']} | {v['outcome']} | {d['median']:.3f} | {d['p90']:.3f} | {d['max']:.3f} | "
                f"{a['median']:.3f} | {a['p90']:.3f} |")
        add("")
    t = results.get("throughput")
    if t:
        add(f"### 4. Throughput: frames/s received, one sender, one receiver "
            f"({t['secs']:g} s per run, {t['rounds']} round(s))")
        add("")
        add("| frame | netbridge untagged | netbridge tagged (+12 B) | Linux bridge, 2 TAPs | "
            "netbridge untagged ÷ Linux | tagged ÷ untagged |")
        add("|---|---|---|---|---|---|")
        m = t["median"]

        def cell(kind, size):
            v = [x["rx_fps"] for x in t["runs"] if x["kind"] == kind and x["size"] == size]
            if not v:
                return "skipped"
            if len(v) == 1:
                return f"{v[0]:,.0f}"
            return f"{statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f})"

        for size in (64, 1474):
            u, g, l = (m.get(f"{k}/{size}") for k in ("netbridge-untagged", "netbridge-tagged", "linux-bridge-tap"))
            ratio = f"{u / l:.2f}" if u and l else "–"
            tr = f"{g / u:.2f}" if u and g else "–"
            add(f"| {size} B | {cell('netbridge-untagged', size)} | {cell('netbridge-tagged', size)} | "
                f"{cell('linux-bridge-tap', size)} | {ratio} | {tr} |")
        if t["rounds"] > 1:
            add("")
            add("Cells: median of the rounds (lowest–highest).")
        cpu = t.get("bridge_cpu", {})
        if cpu:
            add("")
            add("netbridge's own CPU time per forwarded frame (user + system, from /proc): " + ", ".join(
                f"{k.split('-')[1].split('/')[0]} {k.split('/')[1]} B {v:.1f} µs" for k, v in cpu.items()) + ".")
        if "linux_skipped" in t:
            add("")
            add(f"Linux bridge skipped: {t['linux_skipped']}")
        add("")
    for k, v in all_results.items():
        if "failed" in v:
            add(f"Section {k} failed: {v['failed']}")
            add("")
    add("### Goals")
    add("")
    add("| goal | measured | met |")
    add("|---|---|---|")
    for g in goals(results):
        add(f"| {g[0]} | {g[1]} | {g[2]} |")
    return "\n".join(lines)


def goals(results):
    out = []
    c = results.get("codec")
    if c:
        added = max(c[s]["path"]["ns_median"]["added4"] for s in (64, 1474)) / 1000
        worst = max(c[s]["path"]["ns_median"]["tagged4"] for s in (64, 1474)) / 1000
        out.append(("tagging adds < 2 µs per packet",
                    f"adds ≤ {added:.2f} µs; all codec work on a tagged packet's path ≤ {worst:.2f} µs "
                    f"(4 ids, median)", "yes" if worst < GOALS["tag_us"] else "no"))
    j = results.get("join")
    if j and "skipped" not in j:
        ms = j["join_added"]["median"] / 1000
        out.append(("a join adds < 1 ms", f"{ms:.3f} ms median, {j['join_added']['p90'] / 1000:.3f} ms p90",
                    "yes" if ms < GOALS["join_ms"] else "no"))
    f = results.get("fanout")
    if f:
        worst = max(f[f"16/{o}"]["decided"]["median"] for o in ("commit", "abort"))
        p90 = max(f[f"16/{o}"]["decided"]["p90"] for o in ("commit", "abort"))
        out.append(("outcome to 16 members < 5 ms", f"{worst:.3f} ms median, {p90:.3f} ms p90",
                    "yes" if worst < GOALS["fanout16_ms"] else "no"))
    t = results.get("throughput")
    if t:
        m = t["median"]
        ratios = [m[f"linux-bridge-tap/{s}"] / m[f"netbridge-untagged/{s}"]
                  for s in (64, 1474) if f"linux-bridge-tap/{s}" in m and f"netbridge-untagged/{s}" in m]
        if ratios:
            worst = max(ratios)
            out.append(("untagged forwarding within 2× of a Linux bridge",
                        f"Linux / netbridge = {worst:.2f} at worst", "yes" if worst <= GOALS["throughput_ratio"] else "no"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 1 s load runs")
    ap.add_argument("--only", default="codec,join,fanout,throughput")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--md", help="write the markdown tables here")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not args.no_build:
        build()
    for b in (NETBRIDGE, BENCH):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run cargo build --release --workspace")
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    results = {}
    tmp = tempfile.mkdtemp(prefix="specvm-nbbench.")
    try:
        for name, title, fn in (("codec", "1. codec", bench_codec), ("join", "2. join (one VM on the bridge)", bench_join),
                                ("fanout", "3. fan-out", bench_fanout), ("throughput", "4. throughput", bench_throughput)):
            if name not in only:
                continue
            log(title)
            try:
                results[name] = fn(args.quick, tmp)
            except Exception as e:  # noqa: BLE001 - report it, go on with the rest
                log(f"   failed: {e!r}")
                results[name] = {"failed": repr(e)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = render(results, args, started, (load0, os.getloadavg()[0]))
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
