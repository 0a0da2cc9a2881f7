//! The boot cache: a snapshot of the ready guest, so only the first start
//! of an image on a machine pays for its boot.
//!
//! `specvm run --boot-cache` computes a [`CacheKey`] from everything that
//! makes a saved guest valid for this start: the kernel's and initramfs's
//! contents (or the bare program's), the command line the guest gets, the
//! memory size, the vCPU count, whether the host-compat layer is active,
//! the network cards' shape and the snapshot format. Its digest names an
//! entry in `<cache>/boot/`:
//! - on a hit, every file of the entry is checked against the content hashes
//!   recorded when it was saved, and the VM is restored from it;
//! - on a miss (no entry, a damaged one, or one from another
//!   configuration) one line says why, the VM boots, and when its init says
//!   it is ready (the `READY` hypercall, `spec ready`) the controller saves
//!   it into a staging folder that [`PendingSave::finish`] turns into the
//!   entry.
//!
//! The cache folder is `--boot-cache-dir`, else `SPECVM_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/specvm`, else `~/.cache/specvm`. Inside it specvm
//! touches only `boot/`, and in there only folders it made: entries named
//! by a digest and its own staging folders. See `docs/boot-cache.md`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::config::{BootSource, VmConfig};
use crate::progress::BootTimes;
use crate::snapshot::files;

/// Version of the entry layout (`entry.json` and the folder around it).
pub const ENTRY_FORMAT: u32 = 1;
/// The entry's record: key, file hashes, boot time.
const ENTRY_FILE: &str = "entry.json";
/// The snapshot folder inside an entry.
const SNAPSHOT_DIR: &str = "snapshot";
/// The folder of entries inside the cache folder.
const BOOT_DIR: &str = "boot";
/// Staging folders start with this (a dot: never taken for an entry).
const STAGING_PREFIX: &str = ".staging-";
/// The lock taken while entries are added or removed.
const LOCK_FILE: &str = ".lock";
/// Most entries kept; the least recently used beyond this are removed
/// when a new one is saved. A Linux entry holds the guest's touched memory
/// (a few hundred MiB, sparse).
pub const MAX_ENTRIES: usize = 4;
/// Read size when hashing files.
const CHUNK: usize = 1 << 20;

/// Errors of the boot cache that stop the VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum BootCacheError {
    /// No cache folder could be chosen.
    #[error("boot cache: no cache folder: set --boot-cache-dir, SPECVM_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoFolder,
    /// The boot source cannot be cached.
    #[error("boot cache: {0}")]
    Unsupported(&'static str),
    /// A file could not be read or written.
    #[error("boot cache: {what} {path}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        err: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BootCacheError {
    let path = path.to_path_buf();
    move |err| BootCacheError::Io { what, path, err }
}

/// The cache folder: `flag`, else `SPECVM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/specvm` (when absolute, as the XDG spec asks), else
/// `$HOME/.cache/specvm`.
pub fn cache_root(flag: Option<&Path>) -> Result<PathBuf, BootCacheError> {
    root_from(
        flag,
        std::env::var_os("SPECVM_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn root_from(
    flag: Option<&Path>,
    specvm: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf, BootCacheError> {
    let nonempty = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(f) = flag {
        return Ok(f.to_path_buf());
    }
    if let Some(d) = nonempty(specvm) {
        return Ok(d);
    }
    if let Some(x) = nonempty(xdg).filter(|x| x.is_absolute()) {
        return Ok(x.join("specvm"));
    }
    nonempty(home)
        .map(|h| h.join(".cache/specvm"))
        .ok_or(BootCacheError::NoFolder)
}

/// What makes a saved ready guest valid for a start: named fields, compared
/// one by one so a miss can say what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// Field name → value.
    pub fields: BTreeMap<String, String>,
}

impl CacheKey {
    /// The key of `config`'s boot, with the host-compat layer `compat_active`.
    pub fn for_config(config: &VmConfig, compat_active: bool) -> Result<Self, BootCacheError> {
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: String| f.insert(k.to_string(), v);
        match &config.boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                put("guest", "linux".into());
                put("kernel", hash_file(kernel)?);
                put(
                    "initrd",
                    match initrd {
                        Some(i) => hash_file(i)?,
                        None => "none".into(),
                    },
                );
                put(
                    "cmdline",
                    effective_cmdline(cmdline.as_deref(), compat_active),
                );
            }
            BootSource::Bare { program, arg } => {
                put("guest", "bare".into());
                put("program", hash_file(program)?);
                put("guest_arg", arg.to_string());
            }
            BootSource::Restore { .. } => {
                return Err(BootCacheError::Unsupported(
                    "--boot-cache caches a boot; it cannot be combined with --restore",
                ))
            }
        }
        put("memory", config.mem_size.to_string());
        put("cpus", config.vcpus.to_string());
        put(
            "host_compat",
            if compat_active { "active" } else { "inactive" }.into(),
        );
        put(
            "snapshot_format",
            crate::snapshot::codec::FORMAT_VERSION.to_string(),
        );
        let nets: Vec<String> = config
            .nets
            .iter()
            .map(|n| {
                let mac = n.mac.map_or("default".to_string(), |m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                });
                format!("mac={mac},mtu={}", n.mtu)
            })
            .collect();
        put("nets", format!("{}[{}]", nets.len(), nets.join(";")));
        // Each disk's whole content (the VM runs it private, so the boot
        // leaves it as hashed here) and whether it is read-only; not its
        // path. The restore also checks the image's identity.
        let disks = config
            .disks
            .iter()
            .map(|d| {
                let ro = if d.read_only { ",readonly" } else { "" };
                Ok(format!("{}{ro}", hash_file(&d.path)?))
            })
            .collect::<Result<Vec<_>, BootCacheError>>()?;
        if !disks.is_empty() {
            put("disks", format!("{}[{}]", disks.len(), disks.join(";")));
        }
        Ok(Self { fields: f })
    }

    /// The entry's folder name: 32 hex digits of XXH3-128 over the fields.
    pub fn digest(&self) -> String {
        let mut h = Xxh3::new();
        for (k, v) in &self.fields {
            // Lengths first, so no two field lists hash the same bytes.
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
        format!("{:032x}", h.digest128())
    }

    /// The fields whose values differ from `other`'s, by name, with a word
    /// on how.
    pub fn differences(&self, other: &CacheKey) -> Vec<String> {
        let mut names: Vec<&String> = self.fields.keys().chain(other.fields.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| self.fields.get(*n) != other.fields.get(*n))
            .map(|n| describe_difference(n, other.fields.get(n), self.fields.get(n)))
            .collect()
    }
}

/// How field `name` differs: `entry` in the cache, `now` for this start.
fn describe_difference(name: &str, entry: Option<&String>, now: Option<&String>) -> String {
    let show = |v: Option<&String>| v.map_or("(none)".to_string(), |v| v.clone());
    match name {
        "kernel" | "initrd" | "program" => format!("{name} (its content changed)"),
        "disks" => "disks (an image's content, their number or a readonly flag changed)".into(),
        "cmdline" => format!(
            "command line ({:?} now, {:?} saved)",
            show(now),
            show(entry)
        ),
        _ => format!("{name} ({} now, {} saved)", show(now), show(entry)),
    }
}

/// The command line a Linux guest gets (as `linux::cmdline` builds it).
fn effective_cmdline(cmdline: Option<&str>, compat_active: bool) -> String {
    let base = cmdline.unwrap_or(crate::linux::DEFAULT_CMDLINE);
    match compat_active {
        true => crate::host_compat::HostCompat::new().linux_cmdline(base),
        false => base.to_string(),
    }
}

/// XXH3-128 of a whole file, as 32 hex digits.
fn hash_file(path: &Path) -> Result<String, BootCacheError> {
    let f = File::open(path).map_err(io_err("reading", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    let mut h = Xxh3::new();
    hash_range(&f, 0, len, &mut h).map_err(io_err("reading", path))?;
    Ok(format!("{:032x}", h.digest128()))
}

/// Feeds bytes `[start, start + n)` of `f` to `h`.
fn hash_range(f: &File, start: u64, n: u64, h: &mut Xxh3) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(n as usize).max(1)];
    let mut p = start;
    while p < start + n {
        let k = ((start + n - p) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..k], p)?;
        h.update(&buf[..k]);
        p += k as u64;
    }
    Ok(())
}

/// XXH3-128 of a (sparse) snapshot file: its size, then each data run's
/// offset, length and bytes. Holes are never read, so the cost follows the
/// memory the guest touched, not its size. Two files with the same content
/// but holes in other places hash differently, which only costs a miss.
fn hash_sparse(path: &Path) -> Result<(u64, String), BootCacheError> {
    let f = File::open(path).map_err(io_err("reading", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    let mut h = Xxh3::new();
    h.update(&len.to_le_bytes());
    for (start, n) in files::data_runs(&f, len).map_err(io_err("reading", path))? {
        h.update(&start.to_le_bytes());
        h.update(&n.to_le_bytes());
        hash_range(&f, start, n, &mut h).map_err(io_err("reading", path))?;
    }
    Ok((len, format!("{:032x}", h.digest128())))
}

/// One file of an entry, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Its name inside the entry's snapshot folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// [`hash_sparse`] of it.
    pub xxh3: String,
}

/// `entry.json`: what an entry is, and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// [`ENTRY_FORMAT`].
    pub format: u32,
    /// The key it was saved under.
    pub key: CacheKey,
    /// Every file of its snapshot folder.
    pub files: Vec<FileSum>,
    /// Seconds from the VMM's start to the guest's ready call.
    pub boot_secs: f64,
    /// When it was saved, in seconds since the Unix epoch.
    pub saved_unix: u64,
    /// The boot's milestones, for the next boot's progress estimate.
    #[serde(default)]
    pub boot_times: Option<BootTimes>,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A checked entry: restore its snapshot.
    Hit {
        /// The snapshot folder.
        snapshot: PathBuf,
        /// Its state file, read and checked.
        state: crate::config::ReadState,
        /// The entry's record.
        entry: Box<Entry>,
        /// How long checking its files took.
        check: Duration,
    },
    /// None to use, and why, in words for the user, with the boot times
    /// of the nearest entry (a damaged one's, or one of another
    /// configuration), to estimate this boot's progress from.
    Miss(String, Option<BootTimes>),
}

/// The folder of entries in cache folder `root`.
fn boot_dir(root: &Path) -> PathBuf {
    root.join(BOOT_DIR)
}

/// Whether `name` is an entry's folder name (32 lowercase hex digits).
fn is_entry_name(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads an entry's record.
fn read_entry(dir: &Path) -> Result<Entry, String> {
    let path = dir.join(ENTRY_FILE);
    let text = std::fs::read(&path).map_err(|e| format!("{ENTRY_FILE}: {e}"))?;
    if text.len() > 1 << 20 {
        return Err(format!("{ENTRY_FILE} is {} bytes, too large", text.len()));
    }
    let e: Entry = serde_json::from_slice(&text).map_err(|e| format!("{ENTRY_FILE}: {e}"))?;
    if e.format != ENTRY_FORMAT {
        return Err(format!(
            "entry format {} (this specvm writes {ENTRY_FORMAT})",
            e.format
        ));
    }
    Ok(e)
}

/// Checks every file of an entry against its record, and returns its
/// snapshot's state, decoded (the one read of it); the error says which
/// file and how it differs.
fn check_files(dir: &Path, entry: &Entry) -> Result<crate::snapshot::VmSnapshot, String> {
    let snap = dir.join(SNAPSHOT_DIR);
    if entry.files.is_empty() {
        return Err("it lists no files".into());
    }
    for f in &entry.files {
        // Names come from the cache's own record; keep them inside it.
        if f.name.contains('/') || f.name.starts_with('.') {
            return Err(format!("it names a file outside it: {:?}", f.name));
        }
        let path = snap.join(&f.name);
        let md = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", f.name))?;
        if !md.is_file() {
            return Err(format!("{} is not a regular file", f.name));
        }
        if md.len() != f.size {
            return Err(format!(
                "{} is {} bytes, {} when saved",
                f.name,
                md.len(),
                f.size
            ));
        }
        let (_, sum) = hash_sparse(&path).map_err(|e| e.to_string())?;
        if sum != f.xxh3 {
            return Err(format!(
                "{} changed since it was saved (content hash)",
                f.name
            ));
        }
    }
    files::read_state(&snap).map_err(|e| e.to_string())
}

/// Looks `key` up in cache folder `root`.
pub fn lookup(root: &Path, key: &CacheKey) -> Lookup {
    let dir = boot_dir(root).join(key.digest());
    if !dir.exists() {
        let (why, times) = nearest(root, key);
        return Lookup::Miss(why, times);
    }
    let entry = match read_entry(&dir) {
        Ok(e) => e,
        Err(e) => {
            let (_, times) = nearest(root, key);
            return Lookup::Miss(format!("damaged entry {}: {e}", dir.display()), times);
        }
    };
    if entry.key != *key {
        let d = key.differences(&entry.key);
        return Lookup::Miss(
            format!(
                "stale entry {}: it was saved for another configuration ({})",
                dir.display(),
                d.join(", ")
            ),
            entry.boot_times,
        );
    }
    let t = Instant::now();
    let state = match check_files(&dir, &entry) {
        Ok(s) => s,
        Err(e) => {
            return Lookup::Miss(
                format!("damaged entry {}: {e}", dir.display()),
                entry.boot_times,
            )
        }
    };
    let check = t.elapsed();
    // Most recently used last: eviction goes by this time.
    if let Ok(f) = File::options().write(true).open(dir.join(ENTRY_FILE)) {
        let _ = f.set_modified(SystemTime::now());
    }
    Lookup::Hit {
        snapshot: dir.join(SNAPSHOT_DIR),
        state: crate::config::ReadState::new(state),
        entry: Box::new(entry),
        check,
    }
}

/// Why there is no entry: the nearest one and how it differs, if any;
/// with the boot times of the nearest entry that has some.
fn nearest(root: &Path, key: &CacheKey) -> (String, Option<BootTimes>) {
    let mut best: Option<(usize, Vec<String>)> = None;
    let mut times: Option<(usize, BootTimes)> = None;
    for (dir, _) in entries(root) {
        let Ok(e) = read_entry(&dir) else { continue };
        let d = key.differences(&e.key);
        if let Some(t) = e.boot_times.filter(|t| t.total_secs.is_some()) {
            if times.as_ref().is_none_or(|(n, _)| d.len() < *n) {
                times = Some((d.len(), t));
            }
        }
        if best.as_ref().is_none_or(|(n, _)| d.len() < *n) {
            best = Some((d.len(), d));
        }
    }
    let why = match best {
        None => format!("no entry in {}", boot_dir(root).display()),
        Some((_, d)) if d.is_empty() => "no usable entry".to_string(),
        Some((_, d)) => format!(
            "no entry for this configuration; the nearest differs in: {}",
            d.join(", ")
        ),
    };
    (why, times.map(|(_, t)| t))
}

/// The entries in `root`, with their last-use times.
fn entries(root: &Path) -> Vec<(PathBuf, SystemTime)> {
    let Ok(rd) = std::fs::read_dir(boot_dir(root)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_entry_name))
        .map(|e| {
            let used = std::fs::metadata(e.path().join(ENTRY_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            (e.path(), used)
        })
        .collect()
}

/// A boot whose ready guest is to be saved as an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSave {
    root: PathBuf,
    key: CacheKey,
    started: Instant,
    previous: Option<BootTimes>,
}

impl PendingSave {
    /// A save of `key`'s guest into cache folder `root`, for a boot that
    /// started at `started`.
    pub fn new(root: PathBuf, key: CacheKey, started: Instant) -> Self {
        Self {
            root,
            key,
            started,
            previous: None,
        }
    }

    /// The boot times of the nearest entry, if a lookup found one: the
    /// estimate for this boot's progress.
    pub fn previous_times(&self) -> Option<&BootTimes> {
        self.previous.as_ref()
    }

    /// The entry's folder.
    pub fn entry_dir(&self) -> PathBuf {
        boot_dir(&self.root).join(self.key.digest())
    }

    /// How long the boot has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Makes an empty staging folder of this process for the snapshot.
    pub fn staging(&self) -> Result<PathBuf, BootCacheError> {
        let boot = boot_dir(&self.root);
        std::fs::create_dir_all(&boot).map_err(io_err("creating", &boot))?;
        let dir = boot.join(format!(
            "{STAGING_PREFIX}{}-{}",
            self.key.digest(),
            std::process::id()
        ));
        sweep_staging(&boot);
        // Ours by name (digest and this process id): a leftover of an
        // earlier process that had our pid.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err("clearing", &dir))?;
        }
        let snap = dir.join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snap).map_err(io_err("creating", &snap))?;
        Ok(dir)
    }

    /// Turns a staging folder whose `snapshot/` holds the saved guest into
    /// the entry: records the files' hashes durably, then renames it into
    /// place (replacing a damaged or stale entry of the same key), and
    /// removes the least recently used entries beyond [`MAX_ENTRIES`].
    /// Returns the entry's folder.
    pub fn finish(
        &self,
        staging: &Path,
        boot_times: Option<BootTimes>,
    ) -> Result<PathBuf, BootCacheError> {
        let snap = staging.join(SNAPSHOT_DIR);
        let mut sums = Vec::new();
        let rd = std::fs::read_dir(&snap).map_err(io_err("listing", &snap))?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        for name in names {
            let (size, xxh3) = hash_sparse(&snap.join(&name))?;
            sums.push(FileSum { name, size, xxh3 });
        }
        let entry = Entry {
            format: ENTRY_FORMAT,
            key: self.key.clone(),
            files: sums,
            boot_secs: self.started.elapsed().as_secs_f64(),
            saved_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            boot_times,
        };
        let path = staging.join(ENTRY_FILE);
        let text = serde_json::to_vec_pretty(&entry).expect("an entry serializes");
        let mut f = File::create(&path).map_err(io_err("writing", &path))?;
        f.write_all(&text).map_err(io_err("writing", &path))?;
        f.sync_all().map_err(io_err("syncing", &path))?;
        sync_dir(&snap)?;
        sync_dir(staging)?;

        let boot = boot_dir(&self.root);
        let _lock = lock(&boot)?;
        let dest = self.entry_dir();
        if dest.exists() {
            // A damaged or stale entry of this key (a valid one would have
            // been restored), or one another VMM saved meanwhile: ours is
            // as good, and the older one goes.
            let old = boot.join(format!(
                "{STAGING_PREFIX}old-{}-{}",
                self.key.digest(),
                std::process::id()
            ));
            std::fs::rename(&dest, &old).map_err(io_err("moving aside", &dest))?;
            std::fs::rename(staging, &dest).map_err(io_err("renaming", staging))?;
            std::fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
        } else {
            std::fs::rename(staging, &dest).map_err(io_err("renaming", staging))?;
        }
        sync_dir(&boot)?;
        evict(&self.root, &dest);
        Ok(dest)
    }
}

/// Removes the staging folders that VMMs which are no longer running left
/// behind (killed during a save): their names end with the process id.
fn sweep_staging(boot: &Path) {
    let Ok(rd) = std::fs::read_dir(boot) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 sends nothing; it only checks whether
        // the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::info!(
                    folder = name,
                    "boot cache: removed a dead VMM's staging folder"
                ),
                Err(err) => tracing::warn!(
                    folder = name,
                    "boot cache: removing a staging folder: {err}"
                ),
            }
        }
    }
}

/// Takes the cache's lock (`flock`), held until the file is dropped.
fn lock(boot: &Path) -> Result<File, BootCacheError> {
    use std::os::fd::AsRawFd;
    let path = boot.join(LOCK_FILE);
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(BootCacheError::Io {
            what: "locking",
            path,
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

/// fsync of a folder, so renames and new names in it are durable.
fn sync_dir(dir: &Path) -> Result<(), BootCacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

/// Removes the least recently used entries beyond [`MAX_ENTRIES`], never
/// `keep`. A VM restored from a removed entry runs on: its memory file
/// stays until it is unmapped.
fn evict(root: &Path, keep: &Path) {
    let mut all = entries(root);
    if all.len() <= MAX_ENTRIES {
        return;
    }
    all.sort_by_key(|(_, used)| *used);
    let excess = all.len() - MAX_ENTRIES;
    for (dir, _) in all.into_iter().filter(|(d, _)| d != keep).take(excess) {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(entry = %dir.display(), "boot cache: removed the least recently used entry")
            }
            Err(e) => {
                tracing::warn!(entry = %dir.display(), "boot cache: removing an old entry: {e}")
            }
        }
    }
}

/// For `specvm run --boot-cache`: looks the boot up in the cache folder
/// (`dir`, or the default), and either turns `config` into a restore of the
/// saved guest or marks it to be saved when the guest is ready. Prints one
/// line saying which, and why.
pub fn apply(config: &mut VmConfig, dir: Option<&Path>) -> Result<(), BootCacheError> {
    let started = Instant::now();
    if config.full_copy {
        return Err(BootCacheError::Unsupported(
            "--boot-cache saves a snapshot, which needs --checkpoint cow",
        ));
    }
    let root = cache_root(dir)?;
    let compat = crate::host_compat::detect(config.host_compat).active;
    let key = CacheKey::for_config(config, compat)?;
    let found = match lookup(&root, &key) {
        Lookup::Hit {
            snapshot,
            state,
            entry,
            check,
        } => {
            // The key hashed the disks' content; a restore also wants each
            // image's identity (its inode and time) unchanged.
            let snap = state.take();
            match snap
                .as_ref()
                .and_then(|s| crate::snapshot::disks::identity_changes(&config.disks, s))
            {
                Some(why) => Lookup::Miss(
                    format!("entry {}: {why}", snapshot.display()),
                    entry.boot_times.clone(),
                ),
                None => Lookup::Hit {
                    snapshot,
                    state: snap.map(crate::config::ReadState::new).unwrap_or_default(),
                    entry,
                    check,
                },
            }
        }
        miss => miss,
    };
    match found {
        Lookup::Hit {
            snapshot,
            state,
            entry,
            check,
        } => {
            eprintln!(
                "specvm: boot cache: restoring the ready guest from {} (its boot took {}; \
                 files checked in {} ms)",
                snapshot.display(),
                human(Duration::from_secs_f64(entry.boot_secs.max(0.0))),
                check.as_millis()
            );
            config.boot = BootSource::Restore {
                dir: snapshot,
                state,
            };
        }
        Lookup::Miss(why, previous) => {
            let mut save = PendingSave::new(root, key, started);
            save.previous = previous;
            eprintln!(
                "specvm: boot cache: {why}; booting, and saving the ready guest to {}",
                save.entry_dir().display()
            );
            config.boot_cache = Some(save);
        }
    }
    Ok(())
}

/// `1m05s`, `42s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        _ => format!("{}m{:02}s", s / 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("specvm-bc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key(pairs: &[(&str, &str)]) -> CacheKey {
        CacheKey {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn root_follows_flag_then_variables() {
        let s = |v: &str| Some(std::ffi::OsString::from(v));
        let flag = Path::new("/f");
        assert_eq!(
            root_from(Some(flag), s("/a"), s("/x"), s("/h")).unwrap(),
            flag
        );
        assert_eq!(
            root_from(None, s("/a"), s("/x"), s("/h")).unwrap(),
            Path::new("/a")
        );
        assert_eq!(
            root_from(None, s(""), s("/x"), s("/h")).unwrap(),
            Path::new("/x/specvm")
        );
        // A relative XDG_CACHE_HOME is ignored, as the XDG spec says.
        assert_eq!(
            root_from(None, None, s("rel"), s("/h")).unwrap(),
            Path::new("/h/.cache/specvm")
        );
        assert!(matches!(
            root_from(None, None, None, None),
            Err(BootCacheError::NoFolder)
        ));
    }

    #[test]
    fn digests_separate_fields_and_values() {
        let a = key(&[("ab", "c")]);
        let b = key(&[("a", "bc")]);
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), key(&[("ab", "c")]).digest());
        assert!(is_entry_name(&a.digest()));
        assert!(!is_entry_name(".staging-x"));
    }

    #[test]
    fn differences_name_the_fields() {
        let saved = key(&[("initrd", "1"), ("memory", "512"), ("cpus", "2")]);
        let now = key(&[("initrd", "2"), ("memory", "256"), ("cpus", "2")]);
        let d = now.differences(&saved);
        assert_eq!(
            d,
            vec![
                "initrd (its content changed)".to_string(),
                "memory (256 now, 512 saved)".to_string()
            ]
        );
    }

    /// A sparse file hashes by its data runs: the same bytes give the same
    /// hash, one changed byte another one.
    #[test]
    fn sparse_hash_sees_a_changed_byte() {
        let d = tmp("sparse");
        let p = d.join("m");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 5 << 20).unwrap();
        let (len, a) = hash_sparse(&p).unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(hash_sparse(&p).unwrap().1, a);
        f.write_all_at(b"j", 5 << 20).unwrap();
        let (_, b) = hash_sparse(&p).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert_ne!(a, b);
    }

    /// An entry saved by `finish` is found by its key; a changed file makes
    /// it a damaged entry; a new save replaces it.
    #[test]
    fn finish_then_lookup_then_damage() {
        let root = tmp("entry");
        let k = key(&[("guest", "bare"), ("memory", "64")]);
        let save = PendingSave::new(root.clone(), k.clone(), Instant::now());
        let staging = save.staging().unwrap();
        // Not a snapshot: lookup's final read of the state file fails, which
        // is itself a damaged entry; check the file hashes first.
        std::fs::write(staging.join("snapshot/state"), b"not a state file").unwrap();
        let dest = save.finish(&staging, None).unwrap();
        assert_eq!(dest, save.entry_dir());
        assert!(!staging.exists());
        let e = read_entry(&dest).unwrap();
        assert_eq!(e.key, k);
        assert_eq!(e.files.len(), 1);
        match lookup(&root, &k) {
            Lookup::Miss(why, _) => assert!(why.contains("damaged entry"), "{why}"),
            h => panic!("{h:?}"),
        }
        std::fs::write(dest.join("snapshot/state"), b"not a state filE").unwrap();
        match lookup(&root, &k) {
            Lookup::Miss(why, _) => {
                assert!(why.contains("state changed since it was saved"), "{why}")
            }
            h => panic!("{h:?}"),
        }
        // Another key: the miss names what differs.
        let other = key(&[("guest", "bare"), ("memory", "128")]);
        match lookup(&root, &other) {
            Lookup::Miss(why, _) => assert!(why.contains("memory (128 now, 64 saved)"), "{why}"),
            h => panic!("{h:?}"),
        }
        // A second save of the same key replaces the damaged entry.
        let staging = save.staging().unwrap();
        std::fs::write(staging.join("snapshot/state"), b"again").unwrap();
        save.finish(&staging, None).unwrap();
        assert_eq!(read_entry(&dest).unwrap().files[0].size, 5);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn staging_folders_of_dead_vmms_are_swept() {
        let root = tmp("sweep");
        let boot = boot_dir(&root);
        // pid_max is at most 2^22 on Linux: this pid runs nowhere.
        let dead = boot.join(format!("{STAGING_PREFIX}abc-{}", 1 << 23));
        let alive = boot.join(format!("{STAGING_PREFIX}abc-{}", std::process::id()));
        let other = boot.join("user-notes");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        sweep_staging(&boot);
        let left = (dead.exists(), alive.exists(), other.exists());
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(left, (false, true, true));
    }

    #[test]
    fn eviction_keeps_the_newest() {
        let root = tmp("evict");
        let mut dirs = Vec::new();
        for i in 0..MAX_ENTRIES + 2 {
            let k = key(&[("n", &i.to_string())]);
            let save = PendingSave::new(root.clone(), k, Instant::now());
            let staging = save.staging().unwrap();
            std::fs::write(staging.join("snapshot/state"), b"x").unwrap();
            let d = save.finish(&staging, None).unwrap();
            // Distinct last-use times, oldest first.
            let f = File::options()
                .write(true)
                .open(d.join(ENTRY_FILE))
                .unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(1000 + i as u64))
                .unwrap();
            dirs.push(d);
        }
        // The last save evicted one (the oldest then); one more save evicts
        // the next oldest.
        let save = PendingSave::new(root.clone(), key(&[("n", "last")]), Instant::now());
        let staging = save.staging().unwrap();
        std::fs::write(staging.join("snapshot/state"), b"x").unwrap();
        let last = save.finish(&staging, None).unwrap();
        let left = entries(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(left.len(), MAX_ENTRIES);
        assert!(left.iter().any(|(d, _)| *d == last));
        assert!(!left.iter().any(|(d, _)| *d == dirs[0] || *d == dirs[1]));
    }
}
