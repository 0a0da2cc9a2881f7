//! The entries on disk: their records ([`Entry`], [`FileSum`]), looking
//! one up and checking it ([`lookup`]), saving a new one
//! ([`PendingSave`]), and the staging, locking and eviction around that.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::inputs::InputStat;
use super::key::{hash_sparse, CacheKey};
use super::{
    io_err, BootCacheError, BOOT_DIR, ENTRY_FILE, ENTRY_FORMAT, LOCK_FILE, MAX_ENTRIES,
    SNAPSHOT_DIR, STAGING_PREFIX,
};
use crate::progress::BootTimes;
use crate::snapshot::files;

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
    /// The files the key hashed, as they were when hashed: a later start
    /// takes an unchanged file's hash from here (`super::inputs`).
    #[serde(default)]
    pub inputs: Vec<InputStat>,
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
pub(super) fn is_entry_name(name: &str) -> bool {
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
///
/// Each file must be a regular file of the recorded size, and all but the
/// base memory layer must match their recorded content hash. The state
/// file's hash binds the checksums it records for that layer to the entry,
/// and the restore checks the layer against them (`snapshot::verify`, on
/// its own threads while the VM is built): a damaged layer fails the
/// restore, and the VMM then boots instead ([`super::after_damage`]), as
/// for any other damage found here. Hashing the layer here as well read
/// it twice, once before the VM was even built.
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
    }
    let hashed = |f: &FileSum| -> Result<(), String> {
        let (_, sum) = hash_sparse(&snap.join(&f.name)).map_err(|e| e.to_string())?;
        if sum != f.xxh3 {
            return Err(format!(
                "{} changed since it was saved (content hash)",
                f.name
            ));
        }
        Ok(())
    };
    let state_sum = entry
        .files
        .iter()
        .find(|f| f.name == files::STATE)
        .ok_or("it lists no state file")?;
    hashed(state_sum)?;
    let state = files::read_state(&snap).map_err(|e| e.to_string())?;
    let base = state
        .layers
        .first()
        .ok_or("its state names no memory layer")?;
    let base_name = crate::snapshot::memory_name(base.id);
    if !entry.files.iter().any(|f| f.name == base_name) {
        return Err(format!(
            "it does not list {base_name}, which its state names"
        ));
    }
    for f in &entry.files {
        if f.name != files::STATE && f.name != base_name {
            hashed(f)?;
        }
    }
    Ok(state)
}

/// The boot times `key`'s entry in `root` recorded, if it has one.
pub fn boot_times(root: &Path, key: &CacheKey) -> Option<BootTimes> {
    read_entry(&boot_dir(root).join(key.digest()))
        .ok()
        .and_then(|e| e.boot_times)
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

/// The records of hashed files that the entries in `root` keep.
pub fn known_inputs(root: &Path) -> Vec<InputStat> {
    entries(root)
        .into_iter()
        .filter_map(|(dir, _)| read_entry(&dir).ok())
        .flat_map(|e| e.inputs)
        .collect()
}

/// Most file records an entry keeps: the same image may be started from
/// several folders (two checkouts), each path with a record of its own.
pub const MAX_INPUTS: usize = 32;

/// Rewrites the record of the entry in `dir` with `inputs` added, durably
/// (a new file, synced, renamed over the old one, the folder synced): after
/// a hit whose key had to read a file, so the next start need not. The
/// entry's records of other paths stay, newest first, up to
/// [`MAX_INPUTS`].
pub fn record_inputs(dir: &Path, mut entry: Entry, inputs: Vec<InputStat>) -> std::io::Result<()> {
    let older = std::mem::take(&mut entry.inputs);
    entry.inputs = merge_inputs(inputs, older);
    let text = serde_json::to_vec_pretty(&entry).map_err(std::io::Error::other)?;
    crate::durable::replace_file(&dir.join(ENTRY_FILE), &text)
}

/// `new` records, then those of `older` for other paths, at most
/// [`MAX_INPUTS`] in all.
fn merge_inputs(new: Vec<InputStat>, older: Vec<InputStat>) -> Vec<InputStat> {
    let mut all = new;
    for o in older {
        if !all.iter().any(|n| n.path == o.path) {
            all.push(o);
        }
    }
    all.truncate(MAX_INPUTS);
    all
}

/// A boot whose ready guest is to be saved as an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSave {
    root: PathBuf,
    key: CacheKey,
    started: Instant,
    pub(super) previous: Option<BootTimes>,
    /// The files the key hashed, for the entry.
    pub(super) inputs: Vec<InputStat>,
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
            inputs: Vec::new(),
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
            inputs: self.inputs.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_cache::test_support::{key, tmp};

    fn rec(path: &str, xxh3: &str) -> InputStat {
        InputStat {
            path: path.into(),
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
            hashed_at_ns: 6,
            xxh3: xxh3.into(),
        }
    }

    /// A start from another folder adds its records and keeps the other
    /// folder's; a path hashed again replaces its old record; the list is
    /// capped.
    #[test]
    fn records_of_other_paths_stay_and_the_newest_win() {
        let old = vec![rec("/a/kernel", "1"), rec("/b/kernel", "2")];
        let got = merge_inputs(vec![rec("/a/kernel", "9")], old);
        assert_eq!(got, vec![rec("/a/kernel", "9"), rec("/b/kernel", "2")]);
        let many = (0..40).map(|i| rec(&format!("/{i}"), "x")).collect();
        assert_eq!(merge_inputs(vec![], many).len(), MAX_INPUTS);
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
