//! The files a cache key hashes (kernel, initramfs, bare program, disk
//! images), as they were when hashed: each entry keeps them
//! ([`super::Entry::inputs`]), so a later start finds an unchanged file's
//! hash there instead of reading the file again. Reading them was most of
//! a warm start: 27-50 ms of a Linux guest's 57-87 ms from `exec` to the
//! restored machine, for a 51 MiB kernel and a 64 MiB disk image.
//!
//! A record stands for the file's content only while the file has the
//! same device, inode, size, modification time and change time, and only
//! if it was hashed at least [`SETTLED_NS`] after the file's last change.
//! Any write changes the change time, which the kernel takes from a clock
//! that may lag by a tick, so a write made after the hash gets a later
//! change time than the one recorded; without the margin, one made within
//! the same tick as the change before it could go unseen. Nothing outside
//! the kernel can set a change time. (The same reasoning as git's index.)

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, BootCacheError};

/// How long after a file's last change its hash must have been taken for
/// the record to be trusted.
pub const SETTLED_NS: i64 = 1_000_000_000;

/// One hashed file, as it was when hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStat {
    /// Its canonical path.
    pub path: String,
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, in ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Its change time, in ns since the Unix epoch.
    pub ctime_ns: i64,
    /// When the hash was taken (CLOCK_REALTIME, ns), before the first read.
    pub hashed_at_ns: i64,
    /// The content hash (the key's value for it).
    pub xxh3: String,
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn stat(path: &Path) -> std::io::Result<Stat> {
    let md = std::fs::metadata(path)?;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Ok(Stat {
        dev: md.dev(),
        ino: md.ino(),
        size: md.len(),
        mtime_ns: ns(md.mtime(), md.mtime_nsec()),
        ctime_ns: ns(md.ctime(), md.ctime_nsec()),
    })
}

impl InputStat {
    /// Whether this record gives the content hash of `path` (canonical),
    /// which stats as `now`.
    fn vouches_for(&self, path: &str, now: &Stat) -> bool {
        let then = Stat {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        };
        self.path == path
            && then == *now
            && self.ctime_ns.saturating_add(SETTLED_NS) < self.hashed_at_ns
    }
}

/// Hashes the files of one key, taking what it can from `known`.
pub struct Hasher<'a> {
    known: &'a [InputStat],
    /// The record of every file hashed so far: found in `known`, or made
    /// now (a file that changed while it was read gets none).
    pub used: Vec<InputStat>,
    /// How many files were read.
    pub read: usize,
    /// How many hashes came from records.
    pub recorded: usize,
}

impl<'a> Hasher<'a> {
    /// A hasher that trusts the records in `known`.
    pub fn new(known: &'a [InputStat]) -> Self {
        Self {
            known,
            used: Vec::new(),
            read: 0,
            recorded: 0,
        }
    }

    /// The content hash of `path`: a record's, or XXH3-128 of the file.
    pub fn hash(&mut self, path: &Path) -> Result<String, BootCacheError> {
        let canon = path
            .canonicalize()
            .ok()
            .and_then(|p| p.to_str().map(str::to_string));
        let before = stat(path).map_err(io_err("reading", path))?;
        if let Some(c) = &canon {
            if let Some(k) = self.known.iter().find(|k| k.vouches_for(c, &before)) {
                self.used.push(k.clone());
                self.recorded += 1;
                return Ok(k.xxh3.clone());
            }
        }
        let hashed_at_ns = crate::snapshot::now_ns().min(i64::MAX as u64) as i64;
        let xxh3 = super::key::hash_file(path)?;
        self.read += 1;
        if let (Some(path), Ok(after)) = (canon, stat(path)) {
            if after == before {
                self.used.push(InputStat {
                    path,
                    dev: before.dev,
                    ino: before.ino,
                    size: before.size,
                    mtime_ns: before.mtime_ns,
                    ctime_ns: before.ctime_ns,
                    hashed_at_ns,
                    xxh3: xxh3.clone(),
                });
            }
        }
        Ok(xxh3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_cache::test_support::tmp;

    /// A file and a record of it as `hashed_at` after its last change,
    /// with a hash no file has.
    fn planted(name: &str, after_change_ns: i64) -> (std::path::PathBuf, InputStat) {
        let d = tmp(name);
        let p = d.join("kernel");
        std::fs::write(&p, b"the kernel").unwrap();
        let s = stat(&p).unwrap();
        let rec = InputStat {
            path: p.canonicalize().unwrap().to_str().unwrap().to_string(),
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            hashed_at_ns: s.ctime_ns + after_change_ns,
            xxh3: "planted".into(),
        };
        (p, rec)
    }

    #[test]
    fn a_settled_record_of_an_unchanged_file_is_used_without_reading_it() {
        let (p, rec) = planted("inputs-settled", 2 * SETTLED_NS);
        let known = [rec.clone()];
        let mut h = Hasher::new(&known);
        assert_eq!(h.hash(&p).unwrap(), "planted");
        assert_eq!(h.read, 0);
        assert_eq!(h.used, vec![rec]);
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_record_taken_right_after_a_change_is_not_trusted() {
        let (p, rec) = planted("inputs-racy", SETTLED_NS / 2);
        let known = [rec];
        let mut h = Hasher::new(&known);
        assert_eq!(
            h.hash(&p).unwrap(),
            super::super::key::hash_file(&p).unwrap()
        );
        assert_eq!(h.read, 1);
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_changed_file_is_read_again_and_recorded_anew() {
        let (p, rec) = planted("inputs-changed", 2 * SETTLED_NS);
        // The same size, other bytes: the change time moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"THE KERNEL").unwrap();
        let known = [rec];
        let mut h = Hasher::new(&known);
        let sum = h.hash(&p).unwrap();
        assert_eq!(sum, super::super::key::hash_file(&p).unwrap());
        assert_ne!(sum, "planted");
        assert_eq!(h.read, 1);
        let now = stat(&p).unwrap();
        assert_eq!(h.used.len(), 1);
        assert_eq!((h.used[0].ctime_ns, &h.used[0].xxh3), (now.ctime_ns, &sum));
        assert!(h.used[0].hashed_at_ns >= now.ctime_ns - SETTLED_NS);
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_record_of_another_path_is_not_used() {
        let (p, mut rec) = planted("inputs-other", 2 * SETTLED_NS);
        rec.path.push_str(".other");
        let known = [rec];
        let mut h = Hasher::new(&known);
        assert_ne!(h.hash(&p).unwrap(), "planted");
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
