//! The `specvm` command line.
//!
//! Flags follow Firecracker and cloud-hypervisor: one long flag per concern,
//! sizes with binary suffixes (`--memory 256M`), backends as `kind=value`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{
    check_file, check_mem_size, check_vcpus, parse_size, BootSource, ConfigError, HostCompatMode,
    SerialConfig, VmConfig,
};

/// specvm: a KVM virtual machine monitor whose guests can speculate.
#[derive(Debug, Parser)]
#[command(name = "specvm", version, about)]
pub struct Cli {
    /// Log filter: error, warn, info, debug or trace (or a tracing filter).
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest ends it.
    Run(Box<RunArgs>),
    /// Send one request to a running VM's control API.
    Ctl(CtlArgs),
}

/// Arguments of `specvm ctl`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The VM's API socket (its `specvm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// The operation.
    #[arg(value_enum)]
    pub op: crate::api::Op,
    /// The snapshot directory, for `snapshot`; the new image file, for
    /// `disk-export` (a relative one is sent resolved against this
    /// directory).
    #[arg(long, value_name = "PATH")]
    pub path: Option<PathBuf>,
    /// The disk, for `disk-export`: its `--disk` in order, from 0
    /// (default 0).
    #[arg(long, value_name = "N")]
    pub disk: Option<u32>,
    /// Give up after this many seconds without an answer (0: wait for
    /// ever). Default 30, 600 for `snapshot`; for `events`, only connecting
    /// and sending are timed.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

impl CtlArgs {
    /// How long to wait for the VM: `--timeout`, or the operation's
    /// default; `None` waits for ever.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        match self.timeout {
            Some(0) => None,
            Some(s) => Some(std::time::Duration::from_secs(s)),
            None => Some(crate::api::default_timeout(self.op)),
        }
    }
}

/// Arguments of `specvm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A freestanding 64-bit guest program (static ELF), started at CPL3.
    #[arg(
        long,
        value_name = "PROGRAM",
        required_unless_present_any = ["kernel", "restore"],
        conflicts_with = "kernel"
    )]
    pub bare: Option<PathBuf>,
    /// A Linux kernel to boot: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory (`specvm ctl
    /// snapshot --path DIR`) instead of booting. Memory size and vCPU count
    /// come from the snapshot; --net gives new backends for its cards.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["bare", "kernel"])]
    pub restore: Option<PathBuf>,
    /// With --restore: when to check the snapshot's base memory layer
    /// against its checksums: `before-output` (the default: the guest starts
    /// at once, and its writes to devices wait for the check; damage ends
    /// the VMM with none of its output sent), `before-start` (before any
    /// vCPU runs), or `background` (beside the running guest, whose output
    /// goes out meanwhile; damage ends the VMM). Diff layers are always
    /// checked before the guest starts.
    #[arg(
        long,
        value_name = "WHEN",
        requires = "restore",
        num_args = 0..=1,
        default_missing_value = "before-output"
    )]
    pub verify: Option<crate::snapshot::verify::Verify>,
    /// An initramfs for the Linux kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The Linux kernel command line (default: a serial console and the
    /// options tuned for boot time).
    #[arg(long, value_name = "STR", requires = "kernel")]
    pub cmdline: Option<String>,
    /// Guest memory size, such as 256M or 1G (default 128M; with
    /// --restore, the snapshot's, which it must equal if given).
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    pub memory: Option<String>,
    /// Number of vCPUs (default 1; with --restore, the snapshot's).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub cpus: Option<u64>,
    /// A number passed to a bare guest in RDX.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub guest_arg: u64,
    /// Serial console backend: stdout, null, file=PATH or socket=PATH.
    #[arg(long, default_value = "stdout", value_name = "BACKEND")]
    pub serial: String,
    /// This VM's id in speculation ids (default: the process id). VMs that
    /// share a bridge need distinct ids.
    #[arg(long, value_name = "N")]
    pub id: Option<u32>,
    /// Print speculation timings (JSON, one `specvm-stats` line on stderr)
    /// when the VM ends.
    #[arg(long)]
    pub stats: bool,
    /// How checkpoints hold memory: `cow` (copy-on-write, the default) or
    /// `full-copy` (copy all of guest memory: the naive peer that the
    /// benchmarks compare against).
    #[arg(long, default_value = "cow", value_parser = ["cow", "full-copy"])]
    pub checkpoint: String,
    /// Most host memory the speculation checkpoints may hold, such as
    /// `256M` (default: the guest's memory size), or `unlimited`. Once they
    /// hold it, a new `speculate()` fails with NO_BUDGET (-6) until a
    /// commit or abort frees some, and a tagged frame that would need a new
    /// checkpoint is dropped.
    #[arg(long, value_name = "SIZE")]
    pub checkpoint_budget: Option<String>,
    /// Start with every vCPU paused, until `specvm ctl resume` (needs
    /// --api-sock).
    #[arg(long, requires = "api_sock")]
    pub start_paused: bool,
    /// A network device: `bridge=PATH` (a port on netbridge, speculation
    /// across VMs), `socket=PATH` (SOCK_SEQPACKET, a frame per message) or
    /// `tap=NAME`, then optionally `,mac=02:..` and `,mtu=N` (default 1460,
    /// leaving room for the speculation tag). Repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    pub net: Vec<String>,
    /// A virtio-blk disk on a raw image file: `path=FILE[,readonly][,private]`.
    /// Its writes follow the VM's speculations: an abort drops them, and
    /// only the outermost commit writes them to FILE; with `private` (and
    /// always with --restore and --boot-cache) FILE is never written and
    /// the writes stay in memory, lost at exit. With --restore, give the
    /// saved VM's disks again, in order. Repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disk: Vec<String>,
    /// Serve the control API on this Unix socket (mode 0600: only this
    /// user may connect). The path may be new or a stale socket; a live
    /// socket or any other file is refused.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Let this group (a name or a number) use the API socket too: mode
    /// 0660 instead of 0600.
    #[arg(long, value_name = "GROUP", requires = "api_sock")]
    pub api_sock_group: Option<String>,
    /// Start from the boot cache: restore the ready guest saved by an
    /// earlier boot of the same image and configuration, or boot and save
    /// it when its init says it is ready (`spec ready`). See
    /// docs/boot-cache.md.
    #[arg(long, conflicts_with = "restore")]
    pub boot_cache: bool,
    /// The boot cache's folder (default: SPECVM_CACHE_DIR, else
    /// $XDG_CACHE_HOME/specvm, else ~/.cache/specvm).
    #[arg(long, value_name = "DIR", requires = "boot_cache")]
    pub boot_cache_dir: Option<PathBuf>,
    /// Workarounds for hosts whose KVM is not hardware virtualization:
    /// auto (probe the host), on or off.
    #[arg(long, default_value = "auto", value_name = "MODE")]
    pub host_compat: String,
}

/// A command-line error of clap's as one line, for `specvm: error: ...`:
/// its first paragraph (without the usage and tips that follow), its lines
/// joined.
pub fn error_line(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap's text is the whole help.
        return "no command given: `specvm --help` lists them".into();
    }
    let text = e.render().to_string();
    let text = text.trim_start().strip_prefix("error:").unwrap_or(&text);
    let first = text.split("\n\n").next().unwrap_or_default();
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl RunArgs {
    /// Validates the arguments and turns them into a VM configuration.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let (mem_size, vcpus, boot) = match &self.restore {
            Some(dir) => {
                crate::snapshot::verify::set_mode(self.verify.unwrap_or_default());
                self.restore_shape(dir)?
            }
            None => (
                check_mem_size(parse_size(self.memory.as_deref().unwrap_or("128M"))?)?,
                check_vcpus(self.cpus.unwrap_or(1))?,
                self.boot_source()?,
            ),
        };
        Ok(VmConfig {
            mem_size,
            vcpus,
            boot,
            serial: self.serial.parse::<SerialConfig>()?,
            host_compat: self.host_compat.parse::<HostCompatMode>()?,
            vm_id: self.id.unwrap_or_else(std::process::id),
            api_sock: self.api_sock.clone(),
            stats: self.stats,
            full_copy: self.checkpoint == "full-copy",
            start_paused: self.start_paused,
            nets: self.nets()?,
            disks: self.disks()?,
            checkpoint_budget: self.checkpoint_budget(mem_size)?,
            boot_cache: None,
        })
    }

    /// The memory size and vCPU count of the snapshot in `dir`, after
    /// checking its state file whole; `--memory` and `--cpus`, if given,
    /// must equal them.
    fn restore_shape(&self, dir: &std::path::Path) -> Result<(u64, u8, BootSource), ConfigError> {
        let snap = crate::snapshot::files::read_state(dir)
            .map_err(|e| ConfigError::Snapshot(e.to_string()))?;
        if let Some(m) = &self.memory {
            let bytes = parse_size(m)?;
            if bytes != snap.mem_size {
                return Err(ConfigError::RestoreMismatch(format!(
                    "--memory {m} ({bytes} bytes) differs from the snapshot's {} bytes; omit --memory",
                    snap.mem_size
                )));
            }
        }
        let n = snap.machine.vcpus.len() as u64;
        if let Some(c) = self.cpus.filter(|&c| c != n) {
            return Err(ConfigError::RestoreMismatch(format!(
                "--cpus {c} differs from the snapshot's {n} vCPUs; omit --cpus"
            )));
        }
        let mem_size = snap.mem_size;
        Ok((
            mem_size,
            check_vcpus(n)?,
            BootSource::Restore {
                dir: dir.into(),
                state: crate::config::ReadState::new(snap),
            },
        ))
    }

    /// What to boot: clap has already made `--bare` and `--kernel`
    /// mutually exclusive, and one of them required.
    fn boot_source(&self) -> Result<BootSource, ConfigError> {
        if let Some(kernel) = &self.kernel {
            return Ok(BootSource::Linux {
                kernel: check_file("kernel", kernel)?,
                initrd: match &self.initrd {
                    Some(p) => Some(check_file("initrd", p)?),
                    None => None,
                },
                cmdline: self.cmdline.clone(),
            });
        }
        if self.initrd.is_some() {
            return Err(ConfigError::KernelOnly("--initrd"));
        }
        if self.cmdline.is_some() {
            return Err(ConfigError::KernelOnly("--cmdline"));
        }
        let program = self.bare.as_deref().ok_or(ConfigError::NoBootSource)?;
        Ok(BootSource::Bare {
            program: check_file("bare guest program", program)?,
            arg: self.guest_arg,
        })
    }

    fn nets(&self) -> Result<Vec<crate::devices::virtio::net::NetConfig>, ConfigError> {
        use crate::devices::virtio::VIRTIO_MAX_SLOTS;
        if self.net.len() > VIRTIO_MAX_SLOTS as usize {
            return Err(ConfigError::TooManyNets(VIRTIO_MAX_SLOTS));
        }
        self.net.iter().map(|s| Ok(s.parse()?)).collect()
    }

    /// `--checkpoint-budget`: a size, `unlimited`, or by default the
    /// guest's memory size (a guest may rewrite all of its memory once
    /// under speculation; RSS stays below about twice the guest's memory).
    fn checkpoint_budget(&self, mem_size: u64) -> Result<Option<u64>, ConfigError> {
        match self.checkpoint_budget.as_deref() {
            None => Ok(Some(mem_size)),
            Some("unlimited") => Ok(None),
            Some(s) => parse_size(s).map(Some),
        }
    }

    fn disks(&self) -> Result<Vec<crate::devices::virtio::block::BlockConfig>, ConfigError> {
        use crate::devices::virtio::VIRTIO_MAX_SLOTS;
        if self.net.len() + self.disk.len() > VIRTIO_MAX_SLOTS as usize {
            return Err(ConfigError::TooManyDevices(VIRTIO_MAX_SLOTS));
        }
        self.disk
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| ConfigError::Disk(format!("--disk {s}: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<VmConfig, String> {
        let mut argv = vec!["specvm", "run"];
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap().to_string();
        argv.extend(
            args.iter()
                .map(|a| if *a == "g" { exe.as_str() } else { a }),
        );
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(r) = cli.command else {
            return Err("not a run command".into());
        };
        r.to_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = run_args(&["--bare", "g"]).unwrap();
        assert_eq!(c.mem_size, 128 << 20);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert_eq!(c.host_compat, HostCompatMode::Auto);
        assert_eq!(
            c.boot,
            BootSource::Bare {
                program: std::env::current_exe().unwrap(),
                arg: 0
            }
        );
    }

    #[test]
    fn all_flags() {
        let c = run_args(&[
            "--bare",
            "g",
            "--memory",
            "1G",
            "--cpus",
            "2",
            "--guest-arg",
            "7",
            "--serial",
            "null",
            "--host-compat",
            "off",
        ])
        .unwrap();
        assert_eq!(c.mem_size, 1 << 30);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.serial, SerialConfig::Null);
        assert_eq!(c.host_compat, HostCompatMode::Off);
    }

    #[test]
    fn bad_input_is_refused_with_the_value() {
        let e = run_args(&["--bare", "g", "--memory", "12Q"]).unwrap_err();
        assert!(e.contains("12Q"), "{e}");
        let e = run_args(&["--bare", "g", "--memory", "0"]).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = run_args(&["--bare", "g", "--cpus", "0"]).unwrap_err();
        assert!(e.contains("vCPU count 0"), "{e}");
        let e = run_args(&["--bare", "g", "--serial", "tcp=1"]).unwrap_err();
        assert!(e.contains("tcp=1"), "{e}");
        let e = run_args(&["--bare", "g", "--host-compat", "maybe"]).unwrap_err();
        assert!(e.contains("maybe"), "{e}");
        assert!(run_args(&[]).is_err(), "--bare is required");
        let e = run_args(&["--bare", "/no/such/guest"]).unwrap_err();
        assert!(e.contains("bare guest program /no/such/guest"), "{e}");
        let e = run_args(&["--bare", "/tmp"]).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(run_args(&["--bare", "g", "--bogus"]).is_err());
    }

    fn clap_error(args: &[&str]) -> clap::Error {
        Cli::try_parse_from(args).expect_err("a parse error")
    }

    #[test]
    fn clap_errors_become_one_line() {
        let e = clap_error(&["specvm", "run", "--bare", "g", "--cpus", "x"]);
        let line = error_line(&e);
        assert!(line.starts_with("invalid value 'x' for '--cpus"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let e = clap_error(&["specvm", "run", "--bare", "g", "--bogus"]);
        assert_eq!(error_line(&e), "unexpected argument '--bogus' found");
        let e = clap_error(&["specvm", "ctl", "status"]);
        let line = error_line(&e);
        assert!(
            line.contains("required arguments were not provided") && line.contains("--api-sock"),
            "{line}"
        );
        assert_eq!(
            error_line(&clap_error(&["specvm"])),
            "no command given: `specvm --help` lists them"
        );
        // Help and version are not errors: main prints them on stdout.
        assert!(!clap_error(&["specvm", "--help"]).use_stderr());
        assert!(!clap_error(&["specvm", "--version"]).use_stderr());
    }

    #[test]
    fn negative_numbers_reach_the_value_checks() {
        let e = run_args(&["--bare", "g", "--memory", "-1"]).unwrap_err();
        assert!(e.contains("-1"), "{e}");
        let e = run_args(&["--bare", "g", "--cpus", "-1"]).unwrap_err();
        assert!(e.contains("invalid value '-1' for '--cpus"), "{e}");
    }

    #[test]
    fn ctl_timeouts() {
        let ctl = |args: &[&str]| {
            let mut argv = vec!["specvm", "ctl", "--api-sock", "/s"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Ctl(c) => c.timeout(),
                Command::Run(_) => unreachable!(),
            }
        };
        use std::time::Duration;
        assert_eq!(ctl(&["status"]), Some(Duration::from_secs(30)));
        assert_eq!(ctl(&["snapshot"]), Some(Duration::from_secs(600)));
        assert_eq!(
            ctl(&["status", "--timeout", "2"]),
            Some(Duration::from_secs(2))
        );
        assert_eq!(ctl(&["events", "--timeout", "0"]), None);
    }

    #[test]
    fn kernel_flags() {
        let c = run_args(&["--kernel", "g", "--initrd", "g", "--cmdline", "quiet"]).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            c.boot,
            BootSource::Linux {
                kernel: exe.clone(),
                initrd: Some(exe),
                cmdline: Some("quiet".into())
            }
        );
        let e = run_args(&["--kernel", "g", "--bare", "g"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let e = run_args(&["--bare", "g", "--initrd", "g"]).unwrap_err();
        assert!(e.contains("--kernel"), "{e}");
        let c = run_args(&["--kernel", "g", "--net", "tap=t0", "--net", "socket=/s"]).unwrap();
        assert_eq!(c.nets.len(), 2);
        let e = run_args(&["--kernel", "g", "--net", "udp=1"]).unwrap_err();
        assert!(e.contains("udp"), "{e}");
        let e = run_args(&["--kernel", "/no/such/vmlinux"]).unwrap_err();
        assert!(e.contains("kernel /no/such/vmlinux"), "{e}");
    }
}
