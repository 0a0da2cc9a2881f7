#!/bin/bash
# The shared registry's costs (issue 15), side by side in one run:
# - registry operations (start, join, resolve) one at a time, embedded
#   against etcd;
# - outcome latency, from the owner's `resolved` to the last member's
#   `decided`, with 1 and 16 members: one bridge with the embedded
#   registry, two bridges sharing one embedded registry (in one process),
#   one bridge on etcd, two bridges on one etcd.
#
# - the owner's whole bridge killed (a host failure): from the SIGKILL to
#   the member's abort on the other bridge, which only etcd's lease lapse
#   can bring, for leases of 1, 2 and 5 s (the goal: within the lease
#   plus 100 ms).
#
#   benches/registry.sh [ROUNDS]     # default 30 rounds per case (5 for
#                                    # the bridge deaths)
#
# Starts one etcd (tests/tools/fetch-etcd.sh, Debian's etcd-server 3.4) on
# loopback in a temporary folder, and the bridges (release build); kills
# them by PID and removes the folder at exit. Prints JSON lines; the
# results and the command are in docs/benchmarks/registry.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-30}
cargo build --release -q -p netbridge
bin=target/release
etcd=$(tests/tools/fetch-etcd.sh)
work=$(mktemp -d /tmp/specvm-registry-bench.XXXXXX)
pids=()
cleanup() {
    # Bridges first, then etcd: started last, ended first.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cport=$(free_port); pport=$(free_port)
"$etcd" --name b --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "b=http://127.0.0.1:$pport" \
    --heartbeat-interval 50 --election-timeout 500 >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$cport/health" 2>/dev/null | grep -q '"health":"true"' && break
    sleep 0.1
done
url="etcd://127.0.0.1:$cport"

bridge() { # NAME [REGISTRY]
    "$bin/netbridge" --listen "$work/$1.sock" --quiet --registry "${2:-embedded}" --registry-name "$1" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$work/$1.sock" ] && break; sleep 0.05; done
}
bridge emb
bridge e1 "$url"
bridge e2 "$url"
# Two bridges in one process sharing one embedded registry.
"$bin/registry-bench" bridges "$work/s1.sock" "$work/s2.sock" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/s2.sock" ] && break; sleep 0.05; done

echo "# etcd-server $("$etcd" --version | head -1), $(nproc) cores, $rounds rounds"
"$bin/registry-bench" ops --registry embedded --iters 300
"$bin/registry-bench" ops --registry "$url" --iters 300
vm=10000
for n in 1 16; do
    for case in "emb emb" "s1 s2" "e1 e1" "e1 e2"; do
        set -- $case
        echo -n "{\"case\":\"$1->$2\"} "
        "$bin/registry-bench" outcome --owner "$work/$1.sock" --members "$work/$2.sock" \
            --members-n "$n" --rounds "$rounds" --vm "$vm"
        vm=$((vm + 1000))
    done
done

# The owner's bridge dies: a new owner bridge per round (the bench kills
# it by the PID given), one member bridge throughout.
bridge dm "$url"
death_rounds=$(( rounds < 5 ? rounds : 5 ))
for lease in 1000 2000 5000; do
    for _ in $(seq "$death_rounds"); do
        name="do$vm"
        "$bin/netbridge" --listen "$work/$name.sock" --quiet --registry "$url" \
            --registry-name "$name" --lease-ms "$lease" &
        owner_pid=$!
        pids+=($owner_pid)
        for _ in $(seq 100); do [ -S "$work/$name.sock" ] && break; sleep 0.05; done
        "$bin/registry-bench" bridge-death --owner "$work/$name.sock" --owner-pid "$owner_pid" \
            --member "$work/dm.sock" --lease-ms "$lease" --vm "$vm"
        { wait "$owner_pid" || true; } 2>/dev/null   # killed by the bench, as asked
        vm=$((vm + 10))
    done
done
