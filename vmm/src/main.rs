//! `specvm`: the command-line front end of the VMM.

use std::process::ExitCode;

use clap::Parser;
use vmm::builder::{self, Outcome};
use vmm::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: clap prints them on stdout.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&vmm::cli::error_line(&e)),
    };
    // Only `run` handles SIGINT and SIGTERM itself (vmm::signals); `ctl`
    // keeps their default action, so Ctrl-C ends it.
    if matches!(cli.command, Command::Run(_)) {
        if let Err(e) = vmm::signals::install() {
            return fail(&format!("handling SIGINT/SIGTERM: {e}"));
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level);
    let filter = match filter {
        Ok(f) => f,
        Err(e) => return fail(&format!("invalid --log-level '{}': {e}", cli.log_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(vmm::progress::log_writer)
        .init();
    match cli.command {
        Command::Ctl(args) => {
            let timeout = args.timeout();
            let req = vmm::api::Request {
                op: args.op,
                path: args.path,
                disk: args.disk,
            };
            match vmm::api::client_request(&args.api_sock, &req, timeout, &mut std::io::stdout()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Run(args) => {
            if let Some(group) = &args.api_sock_group {
                match specwire::sock::group_id(group) {
                    Ok(gid) => vmm::api::set_socket_group(gid),
                    Err(e) => return fail(&format!("--api-sock-group: {e}")),
                }
            }
            let mut config = match args.to_config() {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            // The configuration as given, for a boot after a damaged entry.
            let given = args.boot_cache.then(|| config.clone());
            if args.boot_cache {
                if let Err(e) = vmm::boot_cache::apply(&mut config, args.boot_cache_dir.as_deref())
                {
                    return fail(&e.to_string());
                }
            }
            let mut built = builder::build(&config);
            // A boot cache entry whose memory layer the restore found
            // damaged: boot instead, and save over it.
            let damaged = match (&built, &config.boot, given) {
                (
                    Err(builder::VmmError::Snapshot(
                        e @ vmm::snapshot::SnapshotError::Layer { .. },
                    )),
                    vmm::config::BootSource::Restore { dir, .. },
                    Some(given),
                ) => Some((
                    dir.parent().unwrap_or(dir).to_path_buf(),
                    e.to_string(),
                    given,
                )),
                _ => None,
            };
            if let Some((entry, why, mut given)) = damaged {
                drop(built);
                let dir = args.boot_cache_dir.as_deref();
                if let Err(e) = vmm::boot_cache::after_damage(&mut given, dir, &entry, &why) {
                    return fail(&e.to_string());
                }
                config = given;
                built = builder::build(&config);
            }
            match built.and_then(|vmm| vmm.run()) {
                Ok(Outcome::Exit(code)) => ExitCode::from(code),
                Ok(Outcome::Reset) => {
                    eprintln!("specvm: the guest reset or powered off");
                    ExitCode::SUCCESS
                }
                Ok(Outcome::Signal(sig)) => {
                    eprintln!("specvm: stopped by signal {sig}");
                    ExitCode::from(128u8.wrapping_add(sig as u8))
                }
                Err(e) => fail(&e.to_string()),
            }
        }
    }
}

/// Prints a one-line error and returns the VMM's failure status.
fn fail(msg: &str) -> ExitCode {
    eprintln!("specvm: error: {msg}");
    ExitCode::FAILURE
}
