//! The VM's configuration, independent of how it was given (CLI, API).

use std::path::PathBuf;

use crate::sync::lock;

/// Smallest guest memory we accept: enough for a bare guest's fixed layout
/// (page tables, stack, program, and its data area at 16 MiB).
pub const MIN_MEM_SIZE: u64 = 32 << 20;
/// Largest guest memory we accept. The bare-guest identity map covers this.
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// Errors in configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string could not be parsed.
    #[error(
        "invalid size '{0}': expected a number with an optional K, M or G suffix, such as 256M"
    )]
    BadSize(String),
    /// A size is not a multiple of the page size.
    #[error("invalid size '{0}': must be a multiple of 4 KiB")]
    Unaligned(String),
    /// The memory size is out of range.
    #[error("guest memory {0:#x} bytes is out of range: must be between 32 MiB and 64 GiB")]
    MemOutOfRange(u64),
    /// The vCPU count is out of range.
    #[error("vCPU count {0} is out of range: must be between 1 and {MAX_VCPUS}")]
    VcpusOutOfRange(u64),
    /// A serial backend specification could not be parsed.
    #[error("invalid serial backend '{0}': expected stdout, null, file=PATH or socket=PATH")]
    BadSerial(String),
    /// A file the VM needs is missing or unreadable.
    #[error("{what} {path}: {err}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it cannot be used.
        err: String,
    },
    /// Neither a bare guest nor a kernel was given.
    #[error("nothing to boot: give --bare PROGRAM or --kernel PATH")]
    NoBootSource,
    /// A Linux-only flag was given without --kernel.
    #[error("{0} needs --kernel")]
    KernelOnly(&'static str),
    /// A `--net` specification is invalid.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetConfigError),
    /// Too many devices.
    #[error("at most {0} network devices")]
    TooManyNets(u32),
    /// Too many virtio devices in all.
    #[error("at most {0} virtio devices (--net and --disk together)")]
    TooManyDevices(u32),
    /// A `--disk` specification is invalid.
    #[error("{0}")]
    Disk(String),
    /// The snapshot to restore cannot be used.
    #[error("--restore: {0}")]
    Snapshot(String),
    /// A flag contradicts the snapshot being restored.
    #[error("--restore: {0}")]
    RestoreMismatch(String),
    /// A host-compat mode could not be parsed.
    #[error("invalid host-compat mode '{0}': expected auto, on or off")]
    BadHostCompat(String),
}

/// Parses a memory size such as `256M`, `1G`, `65536K` or `33554432`.
///
/// A plain number is a count of bytes. Suffixes are binary (K = 1024) and
/// may be written `M`, `MB`, `MiB`, in either case.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let n: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let shift = match t[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes % 4096 != 0 {
        return Err(ConfigError::Unaligned(s.to_string()));
    }
    Ok(bytes)
}

/// Checks a guest memory size against the supported range.
pub fn check_mem_size(bytes: u64) -> Result<u64, ConfigError> {
    if (MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(ConfigError::MemOutOfRange(bytes))
    }
}

/// Checks a vCPU count against the supported range.
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(ConfigError::VcpusOutOfRange(n)),
    }
}

/// Checks that `path` is a readable regular file, so a missing input is
/// reported before any VM is built.
pub fn check_file(what: &'static str, path: &std::path::Path) -> Result<PathBuf, ConfigError> {
    let err = |e: String| ConfigError::File {
        what,
        path: path.to_path_buf(),
        err: e,
    };
    let md = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !md.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(path.to_path_buf())
}

/// Where the serial console's output goes and its input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// Output to the VMM's stdout, input from its stdin.
    Stdout,
    /// Output discarded, no input.
    Null,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time reads the
    /// output and writes input.
    Socket(PathBuf),
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadSerial(s.to_string());
        match s.split_once('=') {
            None if s == "stdout" => Ok(Self::Stdout),
            None if s == "null" => Ok(Self::Null),
            Some(("file", p)) if !p.is_empty() => Ok(Self::File(p.into())),
            Some(("socket", p)) if !p.is_empty() => Ok(Self::Socket(p.into())),
            _ => Err(bad()),
        }
    }
}

/// Whether the host-KVM compatibility layer is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCompatMode {
    /// Probe the host: active when its KVM is not hardware virtualization.
    Auto,
    /// Always active.
    On,
    /// Never active: the VMM behaves as a plain KVM VMM.
    Off,
}

impl std::str::FromStr for HostCompatMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(ConfigError::BadHostCompat(s.to_string())),
        }
    }
}

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A freestanding 64-bit program, started at CPL3 (see `docs/guest-abi.md`).
    Bare {
        /// The program's static ELF file.
        program: PathBuf,
        /// The value passed to the program in RDX.
        arg: u64,
    },
    /// A Linux kernel, booted at its 64-bit entry with boot parameters and
    /// ACPI tables (see `arch::x86_64::boot`).
    Linux {
        /// The kernel: an ELF `vmlinux` or a bzImage.
        kernel: PathBuf,
        /// An initramfs, if any.
        initrd: Option<PathBuf>,
        /// The kernel command line; `None` means the default one.
        cmdline: Option<String>,
    },
    /// A snapshot directory (`docs/snapshots.md`): the VM continues where
    /// it was saved.
    Restore {
        /// The directory.
        dir: PathBuf,
        /// Its state file, if whoever chose the directory (the command line,
        /// the boot cache) already read and checked it: the builder takes
        /// it instead of reading the file again.
        state: ReadState,
    },
}

impl BootSource {
    /// A restore of `dir`, whose state file is still to be read.
    pub fn restore(dir: PathBuf) -> Self {
        Self::Restore {
            dir,
            state: ReadState::default(),
        }
    }
}

/// A snapshot's state file, read and checked once, handed on to the
/// builder, which takes it. Two values compare equal whatever they hold:
/// the directory is what identifies a restore.
#[derive(Clone, Default)]
pub struct ReadState(std::sync::Arc<std::sync::Mutex<Option<crate::snapshot::VmSnapshot>>>);

impl ReadState {
    /// Holds `snap` for the builder.
    pub fn new(snap: crate::snapshot::VmSnapshot) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Some(snap))))
    }

    /// The state, once; `None` if none was read (or it was taken).
    pub fn take(&self) -> Option<crate::snapshot::VmSnapshot> {
        lock(&self.0).take()
    }

    /// Calls `f` with the state to change it, if it has not been taken.
    pub fn update<T>(&self, f: impl FnOnce(&mut crate::snapshot::VmSnapshot) -> T) -> Option<T> {
        let mut g = lock(&self.0);
        g.as_mut().map(f)
    }

    /// Calls `f` with the state, if it has not been taken.
    pub fn peek<T>(&self, f: impl FnOnce(&crate::snapshot::VmSnapshot) -> T) -> Option<T> {
        let g = lock(&self.0);
        g.as_ref().map(f)
    }
}

impl std::fmt::Debug for ReadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadState")
    }
}

impl PartialEq for ReadState {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ReadState {}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What to boot.
    pub boot: BootSource,
    /// The serial console backend.
    pub serial: SerialConfig,
    /// Whether the host-KVM compatibility layer is used.
    pub host_compat: HostCompatMode,
    /// This VM's id, the high half of its speculation ids. Unique among
    /// the VMs that share a bridge.
    pub vm_id: u32,
    /// Where the control API listens, if anywhere.
    pub api_sock: Option<PathBuf>,
    /// Print speculation timings on stderr when the VM ends.
    pub stats: bool,
    /// Checkpoint memory by copying all of it (the benchmarks' naive peer).
    pub full_copy: bool,
    /// Hold the vCPUs until the control API says `resume`.
    pub start_paused: bool,
    /// Network devices, in slot order.
    pub nets: Vec<crate::devices::virtio::net::NetConfig>,
    /// Disks, in slot order after the network devices.
    pub disks: Vec<crate::devices::virtio::block::BlockConfig>,
    /// Most host memory the speculation checkpoints may hold; `None` for
    /// no limit.
    pub checkpoint_budget: Option<u64>,
    /// Save the guest into the boot cache when it says it is ready
    /// (`--boot-cache` on a miss; [`crate::boot_cache`]).
    pub boot_cache: Option<crate::boot_cache::PendingSave>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for s in [
            "",
            "M",
            "12Q",
            "1.5G",
            "-1G",
            "99999999999999999999G",
            "1 G x",
        ] {
            assert!(
                matches!(parse_size(s), Err(ConfigError::BadSize(_))),
                "{s:?} was accepted"
            );
        }
        assert_eq!(
            parse_size("1000"),
            Err(ConfigError::Unaligned("1000".into()))
        );
        assert!(check_mem_size(0).is_err());
        assert!(check_mem_size(16 << 20).is_err());
        assert!(check_mem_size(128 << 30).is_err());
        assert_eq!(check_mem_size(32 << 20), Ok(32 << 20));
    }

    #[test]
    fn vcpus_range() {
        assert!(check_vcpus(0).is_err());
        assert!(check_vcpus(33).is_err());
        assert!(check_vcpus(300).is_err());
        assert_eq!(check_vcpus(2), Ok(2));
    }

    #[test]
    fn serial_specs() {
        assert_eq!("stdout".parse(), Ok(SerialConfig::Stdout));
        assert_eq!("null".parse(), Ok(SerialConfig::Null));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "socket=/tmp/s".parse(),
            Ok(SerialConfig::Socket("/tmp/s".into()))
        );
        for s in ["file=", "tcp=1", "stdin", ""] {
            assert!(s.parse::<SerialConfig>().is_err(), "{s:?} was accepted");
        }
    }
}
