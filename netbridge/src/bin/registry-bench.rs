//! `registry-bench`: the measuring half of `benches/registry.sh` (issue 15).
//!
//! ```text
//! registry-bench ops --registry embedded|etcd://HOST:PORT [--iters N]
//! registry-bench outcome --owner PATH --members PATH [--members-n N] [--rounds R] [--vm V]
//! registry-bench bridges PATH PATH
//! registry-bench bridge-death --owner PATH --owner-pid PID --member PATH [--vm V] [--lease-ms L]
//! ```
//!
//! - `ops` times the registry's operations through
//!   [`RegistryBackend`]: `start`, `join` and `resolve` of fresh ids, one
//!   at a time, and prints one JSON line per operation with the median and
//!   the 90th percentile in microseconds over N.
//! - `outcome` connects to running bridges as ports: an owner (VM V) on
//!   `--owner`, and N members (VMs V+1...) on `--members` (the same bridge
//!   or another one on the same registry). Each round the owner starts an
//!   id, every member says it holds it (`resume`, the trusted join of a
//!   reconnecting VMM: no frame needed, so it works across bridges without
//!   peering), and once the joins are in, the owner commits; the latency
//!   is from the owner's `resolved` to the last member's `decided`. Prints
//!   one JSON line: median and 90th percentile in milliseconds over R.
//! - `bridges` runs two bridges in this process, listening on the two
//!   paths, that share one embedded registry (through the same link as
//!   etcd's), until killed: the case "two bridges, embedded registry".
//! - `bridge-death` measures how long a member waits when its owner's
//!   whole bridge dies (a host failure): an owner (VM V) on the bridge at
//!   `--owner` starts an id, a member (VM V+1) on the bridge at `--member`
//!   holds it, and then the owner's bridge, process `--owner-pid` (which
//!   the calling script started), is SIGKILLed. Only etcd's lease lapse
//!   can end the speculation. Prints the time from the kill to the
//!   member's `decided`, and that time less the bridge's lease.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use netbridge::registry::backend::RegistryBackend;
use netbridge::registry::embedded::Embedded;
use netbridge::registry::etcd::{parse_url, Etcd};
use specwire::protocol::{
    decode, encode_control, read_message, write_message, Control, Message, Outcome,
};
use specwire::SpecId;

/// Benchmarks of the shared registry (see benches/registry.sh).
#[derive(Debug, Parser)]
#[command(name = "registry-bench")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Registry operations, one at a time.
    Ops {
        /// `embedded` or `etcd://HOST:PORT`.
        #[arg(long)]
        registry: String,
        #[arg(long, default_value_t = 300)]
        iters: u32,
    },
    /// Two bridges sharing one embedded registry, until killed.
    Bridges {
        /// The first bridge's socket.
        a: PathBuf,
        /// The second bridge's socket.
        b: PathBuf,
    },
    /// From an owner's decision to its last member's outcome.
    Outcome {
        /// The owner's bridge socket.
        #[arg(long)]
        owner: PathBuf,
        /// The members' bridge socket.
        #[arg(long)]
        members: PathBuf,
        #[arg(long, default_value_t = 1)]
        members_n: u32,
        #[arg(long, default_value_t = 30)]
        rounds: u32,
        /// The owner's VM id; members take the next ones (new ones each
        /// round: a VM id is connected once at a time).
        #[arg(long, default_value_t = 6000)]
        vm: u32,
    },
    /// From the SIGKILL of an owner's bridge to its member's abort.
    BridgeDeath {
        /// The owner's bridge socket.
        #[arg(long)]
        owner: PathBuf,
        /// That bridge's PID, started by the caller: it is killed.
        #[arg(long)]
        owner_pid: i32,
        /// The member's bridge socket (another bridge on the same etcd).
        #[arg(long)]
        member: PathBuf,
        /// The owner bridge's --lease-ms, to report the excess.
        #[arg(long)]
        lease_ms: u64,
        #[arg(long, default_value_t = 7000)]
        vm: u32,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Ops { registry, iters } => ops(&registry, iters),
        Cmd::Bridges { a, b } => bridges(&a, &b),
        Cmd::Outcome {
            owner,
            members,
            members_n,
            rounds,
            vm,
        } => outcome(&owner, &members, members_n, rounds, vm),
        Cmd::BridgeDeath {
            owner,
            owner_pid,
            member,
            lease_ms,
            vm,
        } => bridge_death(&owner, owner_pid, &member, lease_ms, vm),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Median and 90th percentile of `v`.
fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.9))
}

fn ops(registry: &str, iters: u32) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let backend: Arc<dyn RegistryBackend> = if registry == "embedded" {
            Arc::new(Embedded::new())
        } else {
            let eps = parse_url(registry)?;
            let prefix = format!("/bench-{}/", std::process::id());
            Arc::new(
                Etcd::connect(&eps, &prefix, Duration::from_secs(2))
                    .await
                    .map_err(|e| e.to_string())?,
            )
        };
        let (lease, _) = backend
            .grant(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        let (mut start, mut join, mut resolve) = (Vec::new(), Vec::new(), Vec::new());
        for s in 1..=iters {
            let id = SpecId::new(7000, s);
            let t = Instant::now();
            backend.start(id, lease).await.map_err(|e| e.to_string())?;
            start.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            backend
                .join(id, "bench/1".into())
                .await
                .map_err(|e| e.to_string())?;
            join.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            backend
                .resolve(id, Outcome::Commit)
                .await
                .map_err(|e| e.to_string())?;
            resolve.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let _ = backend.revoke(lease).await;
        for (name, v) in [("start", &mut start), ("join", &mut join), ("resolve", &mut resolve)] {
            let (p50, p90) = stats(v);
            println!(
                "{{\"bench\":\"registry-op\",\"registry\":\"{}\",\"op\":\"{name}\",\"iters\":{iters},\"p50_us\":{p50:.1},\"p90_us\":{p90:.1}}}",
                backend.kind()
            );
        }
        Ok(())
    })
}

fn bridges(a: &PathBuf, b: &PathBuf) -> Result<(), String> {
    use netbridge::bridge::Bridge;
    use netbridge::server::{self, Shared};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let registry: Arc<dyn RegistryBackend> = Arc::new(Embedded::new());
        let lease = server::DEFAULT_LEASE;
        for (name, sock) in [("a", a), ("b", b)] {
            let shared = Shared::with_lease(
                Bridge::new(netbridge::tags::read, netbridge::tags::strip).with_shared_registry(),
                lease,
            );
            let tx = netbridge::registry::link::start(
                registry.clone(),
                shared.clone(),
                name.into(),
                lease,
            );
            shared.set_registry(tx);
            let bound = server::bind(sock).map_err(|e| e.to_string())?;
            tokio::spawn(server::serve(bound, shared));
        }
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// A port as VM `vm`, after its welcome.
fn port(sock: &PathBuf, vm: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let hello = Control::Hello {
        vm,
        speculative: true,
    };
    write_message(&mut s, &encode_control(&hello)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    match read_message(&mut s).map(|m| decode(&m)) {
        Ok(Ok(Message::Control(Control::Welcome { .. }))) => Ok(s),
        other => Err(format!("VM {vm}: no welcome: {other:?}")),
    }
}

fn send(s: &mut UnixStream, c: &Control) -> Result<(), String> {
    write_message(s, &encode_control(c)).map_err(|e| e.to_string())
}

/// Reads until `decided` for `id`; acknowledges it. When, and how it
/// ended.
fn wait_decided(s: &mut UnixStream, id: SpecId) -> Result<(Instant, Outcome), String> {
    loop {
        let m = read_message(s).map_err(|e| format!("waiting for {id}: {e}"))?;
        if let Ok(Message::Control(Control::Decided {
            id: got,
            seq,
            outcome,
            ..
        })) = decode(&m)
        {
            let t = Instant::now();
            send(s, &Control::Ack { seq })?;
            if got == id {
                return Ok((t, outcome));
            }
        }
    }
}

fn bridge_death(
    owner: &PathBuf,
    owner_pid: i32,
    member: &PathBuf,
    lease_ms: u64,
    vm: u32,
) -> Result<(), String> {
    if owner_pid <= 1 {
        return Err(format!("--owner-pid {owner_pid}: not a process to kill"));
    }
    let mut o = port(owner, vm)?;
    let id = SpecId::new(vm, 1);
    send(&mut o, &Control::Started { id })?;
    // The start reaches etcd before the member names it.
    std::thread::sleep(Duration::from_millis(100));
    let mut m = port(member, vm + 1)?;
    let resume = Control::Resume {
        started: Vec::new(),
        joined: vec![id],
        outcomes: Vec::new(),
    };
    send(&mut m, &resume)?;
    std::thread::sleep(Duration::from_millis(100));
    m.set_read_timeout(Some(
        Duration::from_millis(lease_ms) * 4 + Duration::from_secs(5),
    ))
    .map_err(|e| e.to_string())?;
    // Renew now, so the lease runs whole from here.
    send(&mut o, &Control::Renew)?;
    let t0 = Instant::now();
    // SAFETY: kill(2) on a PID the calling script started and named.
    if unsafe { libc::kill(owner_pid, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill {owner_pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // The member's VMM stays alive meanwhile: it renews its own port's
    // lease with its bridge.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renew = {
        let mut w = m.try_clone().map_err(|e| e.to_string())?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if send(&mut w, &Control::Renew).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let got = wait_decided(&mut m, id);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = renew.join();
    let (t, how) = got?;
    if how != Outcome::Abort {
        return Err(format!("{id} ended as {how:?}, not abort"));
    }
    let ms = (t - t0).as_secs_f64() * 1e3;
    println!(
        "{{\"bench\":\"owner-bridge-death\",\"lease_ms\":{lease_ms},\"abort_ms\":{ms:.1},\"past_lease_ms\":{:.1}}}",
        ms - lease_ms as f64
    );
    Ok(())
}

fn outcome(owner: &PathBuf, members: &PathBuf, n: u32, rounds: u32, vm: u32) -> Result<(), String> {
    let mut o = port(owner, vm)?;
    let mut lat = Vec::new();
    let mut aborted = 0u32;
    for round in 1..=rounds {
        let id = SpecId::new(vm, round);
        send(&mut o, &Control::Started { id })?;
        // The start reaches the registry before the members name it.
        std::thread::sleep(Duration::from_millis(20));
        let mut ms = Vec::new();
        for i in 1..=n {
            let mut m = port(members, vm + (round - 1) * n + i)?;
            let resume = Control::Resume {
                started: Vec::new(),
                joined: vec![id],
                outcomes: Vec::new(),
            };
            send(&mut m, &resume)?;
            ms.push(m);
        }
        // The joins reach the registry.
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        send(
            &mut o,
            &Control::Resolved {
                id,
                outcome: Outcome::Commit,
            },
        )?;
        let mut last = t0;
        let waits: Vec<_> = ms
            .into_iter()
            .map(|mut m| std::thread::spawn(move || wait_decided(&mut m, id)))
            .collect();
        for w in waits {
            let (t, o) = w
                .join()
                .map_err(|_| "a member thread panicked".to_string())??;
            last = last.max(t);
            // A start the registry refused (no answer within half a
            // lease) ends in abort: counted and reported.
            aborted += u32::from(o != Outcome::Commit);
        }
        lat.push((last - t0).as_secs_f64() * 1e3);
        // Keep the owner's lease.
        send(&mut o, &Control::Renew)?;
    }
    let (p50, p90) = stats(&mut lat);
    println!(
        "{{\"bench\":\"outcome-latency\",\"members\":{n},\"rounds\":{rounds},\"same_bridge\":{},\"p50_ms\":{p50:.3},\"p90_ms\":{p90:.3},\"member_aborts\":{aborted}}}",
        owner == members
    );
    Ok(())
}
