#!/usr/bin/env python3
"""Bridge peering benchmark: frames per second through two netbridges that
peer over UDP in VXLAN framing, against the kernel's own VXLAN between the
same two network namespaces, in one run (issue 15, "Frames per second
across the peering against the kernel's own VXLAN"; goal: within 2x).

    python3 benches/peering.py [--quick] [--no-build] [--json out.json] [--md out.md]

Two namespaces, A and B (specvm-pbench-{a,b}-<pid>), joined by a veth
pair (10.198.0.1/24, 10.198.0.2/24), no IPv6. In each:
- netbridge: a `netbridge --vxlan-listen <own>:4789 --peer <other>:4789`,
  started fresh for each run; `netbridge-bench pump-bridge --sock A
  --rx-sock B` sends UDP/IPv4 frames from a port of A (VM 4001) to a port
  of B (VM 4002), untagged or tagged with a speculation of the sender's;
- reference: the same pump between two ports of bridge A alone (no
  peering), as `benches/netbridge.py` measures it;
- kernel: a Linux bridge with a TAP and a VXLAN device (id 42, dstport
  4790, remote the other side) on it; `netbridge-bench pump-tap --tx
  <A's TAP> --rx <B's TAP> --rx-netns B` writes the same frames into A's
  TAP and reads them from B's.

Both paths carry the same Ethernet frames from user space on A to user
space on B over the same veth; each run sends for a bounded time (1.5 s,
1 s with --quick) and at most 3,000,000 frames, and counts what arrives.
The kinds take turns, in a different order each round; medians are
reported, and the ratio kernel / netbridge (above 1: the kernel is
faster). Needs root, ip(8) and /dev/net/tun. Python 3, stdlib only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
NETBRIDGE = os.path.join(REL, "netbridge")
BENCH = os.path.join(REL, "netbridge-bench")
A_IP, B_IP = "10.198.0.1", "10.198.0.2"
KINDS = ("netbridge-peering-untagged", "netbridge-peering-tagged", "linux-vxlan-tap", "netbridge-untagged")
SIZES = (64, 1400)
MAX_FRAMES = 3_000_000
GOAL_RATIO = 2.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def proc_cpu(pid):
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Fabric:
    """The two namespaces, the veth pair, and the kernel's VXLAN path;
    everything goes with the namespaces on exit."""

    def __init__(self):
        pid = os.getpid()
        self.a, self.b = f"specvm-pbench-a-{pid}", f"specvm-pbench-b-{pid}"
        self.made = []

    def __enter__(self):
        try:
            for ns in (self.a, self.b):
                run("ip", "netns", "add", ns)
                self.made.append(ns)
                run("ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
                run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", self.a, "link", "add", "pbva", "type", "veth", "peer", "name", "pbvb", "netns", self.b)
            for ns, dev, me, other, tap in ((self.a, "pbva", A_IP, B_IP, "pbtapa"),
                                            (self.b, "pbvb", B_IP, A_IP, "pbtapb")):
                ip = ["ip", "-n", ns]
                run(*ip, "addr", "add", f"{me}/24", "dev", dev)
                run(*ip, "link", "set", dev, "up")
                run(*ip, "link", "add", "pbbr", "type", "bridge", "stp_state", "0", "forward_delay", "0")
                run(*ip, "link", "add", "pbvx", "type", "vxlan", "id", "42", "remote", other, "local", me,
                    "dstport", "4790", "dev", dev)
                run(*ip, "tuntap", "add", "dev", tap, "mode", "tap")
                for d in ("pbvx", tap):
                    run(*ip, "link", "set", d, "master", "pbbr", "up")
                run(*ip, "link", "set", "pbbr", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for ns in self.made:
            run("ip", "netns", "del", ns, check=False)


class Peers:
    """Netbridge A and B in their namespaces, peering; killed on exit."""

    def __init__(self, fab, tmp, name):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.socks = [os.path.join(self.dir, "a.sock"), os.path.join(self.dir, "b.sock")]
        self.procs = []
        for ns, sock, me, other in ((fab.a, self.socks[0], A_IP, B_IP), (fab.b, self.socks[1], B_IP, A_IP)):
            err = open(os.path.join(self.dir, os.path.basename(sock) + ".err"), "w")
            # The fake ports of netbridge-bench renew no lease.
            p = subprocess.Popen(["ip", "netns", "exec", ns, NETBRIDGE, "--listen", sock, "--quiet",
                                  "--lease-ms", "600000", "--vxlan-listen", f"{me}:4789",
                                  "--peer", f"{other}:4789"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            self.procs.append(p)
        deadline = time.time() + 10
        while not all(os.path.exists(s) for s in self.socks):
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                self.close()
                raise RuntimeError("netbridge did not start: " + open(os.path.join(self.dir, "a.sock.err")).read())
            time.sleep(0.01)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bench(quick, tmp):
    secs = 1.0 if quick else 1.5
    rounds = 1 if quick else 5
    load = ["--secs", str(secs), "--max-frames", str(MAX_FRAMES)]
    res = {"secs": secs, "rounds": rounds, "runs": []}
    with Fabric() as fab:
        for r in range(rounds):
            for size in SIZES:
                for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:
                    if kind.startswith("netbridge"):
                        with Peers(fab, tmp, f"{r}-{size}-{kind}") as peers:
                            cmd = [BENCH, "pump-bridge", "--sock", peers.socks[0], "--size", str(size), *load]
                            if "peering" in kind:
                                cmd += ["--rx-sock", peers.socks[1]]
                            if kind.endswith("-tagged"):
                                cmd.append("--tagged")
                            cpu0 = sum(proc_cpu(p.pid) for p in peers.procs)
                            out = run(*cmd).stdout
                            cpu = sum(proc_cpu(p.pid) for p in peers.procs) - cpu0
                    else:
                        out = run("ip", "netns", "exec", fab.a, BENCH, "pump-tap", "--tx", "pbtapa",
                                  "--rx", "pbtapb", "--rx-netns", fab.b, "--size", str(size), *load).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    row["round"] = r
                    if kind.startswith("netbridge") and row["received"]:
                        row["bridges_cpu_us_per_frame"] = cpu * 1e6 / row["received"]
                    res["runs"].append(row)
                    log(f"  {kind:27} {size:5} B: {row['rx_fps']:>9.0f} frames/s "
                        f"({row['received']}/{row['sent']} received)")
    res["median"] = {}
    res["cpu"] = {}
    for size in SIZES:
        for kind in KINDS:
            rows = [x for x in res["runs"] if x["kind"] == kind and x["size"] == size]
            if rows:
                res["median"][f"{kind}/{size}"] = statistics.median(x["rx_fps"] for x in rows)
                res["median"][f"{kind}/{size}/range"] = (min(x["rx_fps"] for x in rows),
                                                         max(x["rx_fps"] for x in rows))
                res["median"][f"{kind}/{size}/delivered"] = statistics.median(
                    x["received"] / max(1, x["sent"]) for x in rows)
            cpu = [x["bridges_cpu_us_per_frame"] for x in rows if "bridges_cpu_us_per_frame" in x]
            if kind == "linux-vxlan-tap":
                # Paired by round: both ran seconds apart, under the same
                # load from the rest of the machine.
                ours = {x["round"]: x["rx_fps"] for x in res["runs"]
                        if x["kind"] == "netbridge-peering-untagged" and x["size"] == size}
                pairs = [x["rx_fps"] / ours[x["round"]] for x in rows if ours.get(x["round"])]
                if pairs:
                    res["median"][f"ratio/{size}"] = (statistics.median(pairs), min(pairs), max(pairs))
            if cpu:
                res["cpu"][f"{kind}/{size}"] = statistics.median(cpu)
    return res


def render(res, args, started, load):
    lines = []
    add = lines.append
    add(f"Command: `python3 benches/peering.py{' --quick' if args.quick else ''}`, "
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()} ({os.cpu_count()} CPUs), "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after; "
        f"{res['rounds']} rounds of {res['secs']} s per kind and size.")
    add("")
    add("Frames per second received, median of the rounds (lowest-highest; share of the frames sent "
        "that arrived):")
    add("")
    add("The ratio is kernel / netbridge (untagged), taken round by round (the two ran seconds apart) "
        "and given as the median (lowest-highest) of the rounds; above 1, the kernel is faster.")
    add("")
    add("| frame | netbridge peering, untagged | tagged | kernel VXLAN | kernel / netbridge | goal "
        "| one netbridge, no peering (reference) |")
    add("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    m = res["median"]
    for size in SIZES:
        u = m.get(f"netbridge-peering-untagged/{size}")
        t = m.get(f"netbridge-peering-tagged/{size}")
        k = m.get(f"linux-vxlan-tap/{size}")

        def cell(v, kind):
            if v is None:
                return "-"
            lo, hi = m[f"{kind}/{size}/range"]
            return (f"{v:,.0f} /s ({lo:,.0f}-{hi:,.0f}; "
                    f"{m[f'{kind}/{size}/delivered'] * 100:.0f}% delivered)")
        pr = m.get(f"ratio/{size}")
        ratio = f"{pr[0]:.2f}x ({pr[1]:.2f}-{pr[2]:.2f})" if pr else "-"
        met = "-" if not pr else ("met" if pr[0] <= GOAL_RATIO else "not met")
        add(f"| {size} B | {cell(u, 'netbridge-peering-untagged')} | {cell(t, 'netbridge-peering-tagged')} | "
            f"{cell(k, 'linux-vxlan-tap')} | {ratio} | within {GOAL_RATIO:.0f}x: {met} | "
            f"{cell(m.get(f'netbridge-untagged/{size}'), 'netbridge-untagged')} |")
    add("")
    if res["cpu"]:
        add("CPU of both bridges per frame received (median): " + ", ".join(
            f"{k}: {v:.2f} us" for k, v in sorted(res["cpu"].items())) + ".")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, 1 s load runs")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--md", help="write the markdown table here")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        sys.exit("skipped: needs root, ip(8) and /dev/net/tun")
    if not args.no_build:
        log("building: cargo build --release -p netbridge --bins")
        subprocess.run(["cargo", "build", "--release", "-p", "netbridge", "--bins", "--quiet"], cwd=ROOT, check=True)
    for b in (NETBRIDGE, BENCH):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run cargo build --release -p netbridge --bins")
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="specvm-pbench.")
    try:
        res = bench(args.quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = render(res, args, started, (load0, os.getloadavg()[0]))
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
