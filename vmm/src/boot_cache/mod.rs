//! The boot cache: a snapshot of the ready guest, so only the first start
//! of an image on a machine pays for its boot.
//!
//! `specvm run --boot-cache` computes a [`CacheKey`] from everything that
//! makes a saved guest valid for this start: the kernel's and initramfs's
//! contents (or the bare program's), the command line the guest gets, the
//! memory size, the vCPU count, whether the host-compat layer is active,
//! the network cards' shape and the snapshot format. Its digest names an
//! entry in `<cache>/boot/`:
//! - on a hit, every file of the entry is checked against the sizes and
//!   content hashes recorded when it was saved (the memory layer's content
//!   is left to the restore's own check: on damage there the VMM boots
//!   instead, [`after_damage`]), and the VM is restored from it;
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

mod inputs;
mod key;
mod store;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{BootSource, VmConfig};

pub use key::CacheKey;
pub use store::{lookup, Entry, FileSum, Lookup, PendingSave};

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
/// For `specvm run --boot-cache`: looks the boot up in the cache folder
/// (`dir`, or the default), and either turns `config` into a restore of the
/// saved guest or marks it to be saved when the guest is ready. Prints one
/// line saying which, and why.
pub fn apply(config: &mut VmConfig, dir: Option<&Path>) -> Result<(), BootCacheError> {
    decide(config, dir, None)
}

/// After the restore from entry `entry` failed on damage its lookup does
/// not look for (the memory layer's content, which the restore checks):
/// `config` is the start's configuration as it was before [`apply`]. Marks
/// it to boot and save the ready guest over the damaged entry, with one
/// line saying so, as a lookup that found the damage would have.
pub fn after_damage(
    config: &mut VmConfig,
    dir: Option<&Path>,
    entry: &Path,
    why: &str,
) -> Result<(), BootCacheError> {
    let why = format!("damaged entry {}: {why}", entry.display());
    decide(config, dir, Some(why))
}

/// [`apply`], or with `refused` the miss [`after_damage`] reports.
fn decide(
    config: &mut VmConfig,
    dir: Option<&Path>,
    refused: Option<String>,
) -> Result<(), BootCacheError> {
    let started = Instant::now();
    if config.full_copy {
        return Err(BootCacheError::Unsupported(
            "--boot-cache saves a snapshot, which needs --checkpoint cow",
        ));
    }
    let root = cache_root(dir)?;
    let compat = crate::host_compat::detect(config.host_compat).active;
    let known = store::known_inputs(&root);
    let mut hasher = inputs::Hasher::new(&known);
    let key = CacheKey::for_config(config, compat, &mut hasher)?;
    tracing::info!(
        read = hasher.read,
        recorded = hasher.recorded,
        "boot cache: key's file hashes"
    );
    let mut found = match refused {
        None => lookup(&root, &key),
        Some(why) => Lookup::Miss(why, store::boot_times(&root, &key)),
    };
    // The key hashed each disk's whole content, so an image with the same
    // bytes is the one the entry was saved over even if it was rebuilt or
    // copied since (another inode and time): the restore takes its
    // identity as it is now.
    if let Lookup::Hit {
        snapshot,
        state,
        entry,
        ..
    } = &found
    {
        let r = state.update(|s| crate::snapshot::disks::adopt_identities(&config.disks, s));
        if let Some(Err(why)) = r {
            let why = format!("entry {}: {why}", snapshot.display());
            found = Lookup::Miss(why, entry.boot_times.clone());
        }
    }
    match found {
        Lookup::Hit {
            snapshot,
            state,
            entry,
            check,
        } => {
            if hasher.read > 0 {
                // Once per entry (saved before entries kept them, or a
                // file rebuilt with the same bytes): the next start finds
                // the hashes here instead of reading the files.
                if let Some(dir) = snapshot.parent() {
                    let (e, inputs) = (entry.as_ref().clone(), hasher.used);
                    if let Err(err) = store::record_inputs(dir, e, inputs) {
                        tracing::debug!("boot cache: recording the hashed files: {err}");
                    }
                }
            }
            eprintln!(
                "specvm: boot cache: restoring the ready guest from {} (its boot took {}; \
                 files checked in {} ms)",
                snapshot.display(),
                human(Duration::from_secs_f64(entry.boot_secs.max(0.0))),
                check.as_millis()
            );
            // The layer is checked before the guest starts: damage found
            // then falls back to a boot (`after_damage`), which a guest
            // already running could not.
            crate::snapshot::verify::set_mode(crate::snapshot::verify::Verify::BeforeStart);
            config.boot = BootSource::Restore {
                dir: snapshot,
                state,
            };
        }
        Lookup::Miss(why, previous) => {
            let mut save = PendingSave::new(root, key, started);
            save.previous = previous;
            save.inputs = hasher.used;
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
}

/// Folders and keys the tests of several submodules share.
#[cfg(test)]
mod test_support {
    use std::path::PathBuf;

    use super::CacheKey;

    pub(super) fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("specvm-bc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    pub(super) fn key(pairs: &[(&str, &str)]) -> CacheKey {
        CacheKey {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}
