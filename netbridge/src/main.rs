//! `netbridge`: the virtual switch between specvm guests.
//!
//! ```text
//! netbridge --listen /run/specvm/bridge.sock [--uplink tap=NAME]
//!           [--events PATH] [--group GROUP] [--quiet]
//! ```
//!
//! VMMs connect to `--listen` as ports (see `docs/netbridge.md`). With
//! `--uplink tap=NAME` the TAP interface NAME (created if missing) is a port
//! too, to the host's network stack, which gets tagged frames only once
//! they commit. Every speculation event is printed as a JSON line on stdout
//! (unless `--quiet`) and streamed to clients of `--events`.
//!
//! Both sockets are mode 0600 (0660 with `--group`), replace only a stale
//! socket, and are removed at exit only while they are still the bridge's
//! own ([`netbridge::sock`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netbridge::bridge::Bridge;
use netbridge::server::{self, Shared};
use netbridge::sock::Access;
use netbridge::uplink::{Tap, Uplink, UplinkSpec};

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
    /// Do not print events on stdout.
    #[arg(long)]
    quiet: bool,
    /// Log filter for stderr.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => return fail(&format!("invalid --log-level '{}': {e}", args.log_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let shared = Shared::new(Bridge::new(netbridge::tags::read, netbridge::tags::strip));
    if !args.quiet {
        let mut rx = shared.subscribe();
        tokio::spawn(async move {
            while let Ok(e) = rx.recv().await {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            }
        });
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
    let ports = server::bind_with(&args.listen, &access).map_err(|e| e.to_string())?;
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
    tokio::select! {
        () = server::serve(ports, shared) => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("netbridge: error: {msg}");
    ExitCode::FAILURE
}
