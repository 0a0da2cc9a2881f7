//! `netbridge`: the virtual switch between specvm guests.
//!
//! ```text
//! netbridge --listen /run/specvm/bridge.sock [--uplink tap=NAME]
//!           [--events PATH] [--group GROUP] [--lease-ms N] [--quiet]
//!           [--registry embedded|etcd://HOST:PORT[,HOST:PORT...]]
//!           [--registry-name NAME] [--registry-retention SECONDS]
//!           [--peer HOST:PORT]... [--vxlan-listen ADDR:PORT] [--vni N]
//! ```
//!
//! `--registry etcd://...` keeps the speculations' outcomes in etcd, shared
//! with the bridges of other hosts (`docs/registry.md`).
//!
//! VMMs connect to `--listen` as ports (see `docs/netbridge.md`). With
//! `--uplink tap=NAME` the TAP interface NAME (created if missing) is a port
//! too, to the host's network stack, which gets tagged frames only once
//! they commit. With `--peer`, frames and outcomes are exchanged with the
//! bridges named, over UDP in VXLAN framing ([`netbridge::peer`]). Every
//! speculation event is printed as a JSON line on stdout
//! (unless `--quiet`) and streamed to clients of `--events`.
//!
//! Both sockets are mode 0600 (0660 with `--group`), replace only a stale
//! socket, and are removed at exit only while they are still the bridge's
//! own ([`netbridge::sock`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netbridge::bridge::{Bridge, Event};
use netbridge::peer::Config as PeerConfig;
use netbridge::server::{self, Shared};
use netbridge::sock::Access;
use netbridge::uplink::{Tap, Uplink, UplinkSpec};
use tokio::sync::broadcast::{self, error::RecvError};

/// The speculation-aware virtual switch for specvm guests.
#[derive(Debug, Parser)]
#[command(name = "netbridge", version, about)]
struct Args {
    /// The Unix socket VMMs connect to.
    #[arg(long, value_name = "PATH")]
    listen: PathBuf,
    /// A port to the host: `tap=NAME` attaches the TAP interface NAME,
    /// creating it if it does not exist (needs CAP_NET_ADMIN). The host
    /// cannot roll back, so a speculative frame reaches it only once its
    /// speculations commit, untagged, and never if one aborts.
    #[arg(long, value_name = "tap=NAME")]
    uplink: Option<UplinkSpec>,
    /// A Unix socket that streams events as JSON lines.
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// Let this group (a name or a number) connect to the sockets too:
    /// mode 0660 instead of 0600.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// The lease of a VMM port in milliseconds: a VMM that sends nothing
    /// for this long (it renews at a third of it) is taken for hung, and
    /// the speculations its VM owns abort. Also the recovery after a
    /// restart lasts two leases.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(30..=600_000))]
    lease_ms: u32,
    /// Where outcomes are kept: `embedded` (this process, the default) or
    /// `etcd://HOST:PORT[,HOST:PORT...]`, an etcd cluster shared with the
    /// bridges of other hosts (docs/registry.md).
    #[arg(long, value_name = "URL", default_value = "embedded")]
    registry: RegistrySpec,
    /// This bridge's name in the shared registry (its members' keys).
    /// Default: HOST:LISTEN, the host name and the --listen path.
    #[arg(long, value_name = "NAME")]
    registry_name: Option<String>,
    /// How long a shared registry keeps each outcome, in seconds (0: for
    /// ever). A bridge away for longer finds its members' outcomes gone,
    /// and they abort (the rule for unknown ids): set it above the longest
    /// outage a bridge may have (docs/registry.md).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(u32).range(0..=31_536_000))]
    registry_retention: u32,
    /// Do not print events on stdout.
    #[arg(long)]
    quiet: bool,
    /// A peer bridge (repeatable): frames go to and come from it over UDP
    /// in VXLAN framing, and datagrams are taken only from the peers
    /// named, by their source address and port (their --vxlan-listen).
    #[arg(long, value_name = "HOST:PORT")]
    peer: Vec<String>,
    /// The UDP address peers send to, and this bridge sends from (the
    /// default port is VXLAN's, 4789). Bound only with --peer or this.
    #[arg(long, value_name = "ADDR:PORT")]
    vxlan_listen: Option<String>,
    /// The VXLAN network identifier of the frames (24 bits); control
    /// messages use the next one. Every peer must use the same.
    #[arg(long, value_name = "N", default_value_t = netbridge::peer::DEFAULT_VNI,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(netbridge::peer::vxlan::VNI_MAX)))]
    vni: u32,
    /// Log filter for stderr.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

/// `--registry`.
#[derive(Debug, Clone)]
enum RegistrySpec {
    Embedded,
    Etcd(Vec<String>),
}

impl std::str::FromStr for RegistrySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            return Ok(Self::Embedded);
        }
        netbridge::registry::etcd::parse_url(s).map(Self::Etcd)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        // --help and --version: clap prints them on stdout.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&error_line(&e)),
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => return fail(&format!("invalid --log-level '{}': {e}", args.log_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting the runtime: {e}")),
    };
    let r = rt.block_on(run(&args));
    // The sockets' files go with the tasks that hold them, and only if
    // they are still ours: a bridge that failed to start removes nothing.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let lease = std::time::Duration::from_millis(args.lease_ms.into());
    let mut bridge = Bridge::new(netbridge::tags::read, netbridge::tags::strip);
    if matches!(args.registry, RegistrySpec::Etcd(_)) {
        bridge = bridge.with_shared_registry();
    }
    let shared = Shared::with_lease(bridge, lease);
    if let RegistrySpec::Etcd(endpoints) = &args.registry {
        // A request unanswered for a lease (at most 5 s) counts the
        // registry as unreachable, as a VMM silent for a lease counts as
        // hung. Half a lease refused starts while a loaded machine's etcd
        // was only slow (fsync), in the benchmark.
        let timeout = lease.min(std::time::Duration::from_secs(5));
        let etcd = netbridge::registry::etcd::Etcd::connect(
            endpoints,
            netbridge::registry::etcd::DEFAULT_PREFIX,
            timeout,
        )
        .await
        .map_err(|e| format!("--registry: {e}"))?
        .with_retention(match args.registry_retention {
            0 => None,
            s => Some(std::time::Duration::from_secs(s.into())),
        });
        let name = args
            .registry_name
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), args.listen.display()));
        let tx = netbridge::registry::link::start(
            std::sync::Arc::new(etcd),
            shared.clone(),
            name,
            lease,
        );
        shared.set_registry(tx);
    }
    if !args.quiet {
        print_events(shared.subscribe()).map_err(|e| format!("starting the event printer: {e}"))?;
    }
    // The TAP first: its errors (no /dev/net/tun, no permission) are the
    // likeliest, and nothing is bound yet when they stop the bridge.
    let tap = match &args.uplink {
        Some(UplinkSpec::Tap(name)) => Some(Tap::open(name).map_err(|e| e.to_string())?),
        None => None,
    };
    let access = Access {
        group: match &args.group {
            Some(g) => Some(netbridge::sock::group_id(g)?),
            None => None,
        },
    };
    let peering = match (&args.vxlan_listen, args.peer.is_empty()) {
        (None, true) => None,
        (listen, _) => {
            let listen = listen.as_deref().unwrap_or("0.0.0.0:4789");
            Some(PeerConfig::resolve(listen, &args.peer, args.vni).map_err(|e| e.to_string())?)
        }
    };
    let ports = server::bind_with(&args.listen, &access).map_err(|e| e.to_string())?;
    if let Some(config) = &peering {
        netbridge::peer::io::start(config, shared.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    if let Some(tap) = tap {
        let uplink = Uplink::attach(tap, shared.clone()).map_err(|e| e.to_string())?;
        // Losing the uplink does not stop the bridge: the VMs on it keep
        // their speculations and their traffic with each other.
        tokio::spawn(async move {
            let e = uplink.run().await;
            tracing::error!("uplink lost, the bridge runs on without it: {e}");
        });
    }
    if let Some(p) = &args.events {
        let events = server::bind_with(p, &access).map_err(|e| e.to_string())?;
        tokio::spawn(server::serve_events(events, shared.clone()));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let at_exit = shared.clone();
    tokio::select! {
        () = server::serve(ports, shared) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    at_exit.say_counters_at_exit();
    Ok(())
}

/// Prints events on stdout, one JSON line each, from a thread of its own:
/// a stdout nobody reads stalls that thread only (the events it misses are
/// reported as a `lagged` line), never the bridge. Once stdout is gone (a
/// closed pipe, as after `netbridge ... | head -1`) it says so once and
/// stops printing; the bridge runs on.
fn print_events(mut rx: broadcast::Receiver<Event>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("events-stdout".into())
        .spawn(move || loop {
            let line = match rx.blocking_recv() {
                Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
                Err(RecvError::Lagged(n)) => format!("{{\"event\":\"lagged\",\"dropped\":{n}}}"),
                Err(RecvError::Closed) => return,
            };
            let mut out = std::io::stdout().lock();
            if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                tracing::warn!("events are no longer printed: stdout: {e}");
                return;
            }
        })
        .map(drop)
}

/// clap's error as one line: its first paragraph, without the `error:`
/// prefix, blanks folded (the usage and the `--help` hint are left out).
fn error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start().strip_prefix("error:").unwrap_or(&text);
    let first = text.split("\n\n").next().unwrap_or_default();
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("netbridge: error: {msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clap_error(argv: &[&str]) -> clap::Error {
        Args::try_parse_from(argv).expect_err("a parse error")
    }

    #[test]
    fn parse_errors_are_one_line() {
        let line = error_line(&clap_error(&["netbridge"]));
        assert_eq!(
            line,
            "the following required arguments were not provided: --listen <PATH>"
        );
        let line = error_line(&clap_error(&["netbridge", "--listen", "s", "--bogus"]));
        assert_eq!(line, "unexpected argument '--bogus' found");
        let line = error_line(&clap_error(&[
            "netbridge",
            "--listen",
            "s",
            "--uplink",
            "x",
        ]));
        assert!(
            line.starts_with("invalid value 'x' for '--uplink"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        // Help and version are not errors: main prints them on stdout.
        assert!(!clap_error(&["netbridge", "--help"]).use_stderr());
        assert!(!clap_error(&["netbridge", "--version"]).use_stderr());
    }
}
