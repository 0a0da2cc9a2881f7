//! `specvm ctl disk-export`: a private disk's committed content written to
//! a new image file, for the host's tools (e2fsck, debugfs, a later
//! `--disk`).
//!
//! A private disk (every restored VM's, every boot-cache VM's) never
//! writes its image: what the guest committed lives in the private level
//! and is lost with the VMM. An export writes the image's bytes with the
//! private level over them, and nothing of an open speculation: what is
//! exported is output, so it follows the output commit rule like a frame
//! to an uplink.
//!
//! The work is split so the VM is held for the copy of a map, not for the
//! disk's size: [`ExportSource::take`] runs with the device locked and
//! clones the private level (at most the overlay budget) and the image's
//! descriptor; [`ExportSource::write`] then runs on a thread of its own.
//! The image is never written by a private disk, so reading it unlocked
//! is safe.
//!
//! The file is the user's: it must not exist (an existing path is refused,
//! never replaced). The bytes go to a temporary name in the same folder,
//! are synced, then linked to the name asked for (a link fails if the
//! name appeared meanwhile, where a rename would replace it), and the
//! folder is synced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::overlay::{Granule, LevelMap, GRANULE};
use super::BlockHandle;

use crate::sync::lock;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The disk writes its image itself.
    #[error(
        "disk {0} is not private: it writes its image directly, so the image is its \
         committed content (copy it while the VM is paused or stopped)"
    )]
    NotPrivate(PathBuf),
    /// The target is taken.
    #[error("{0} exists; disk-export writes a new file and never replaces one")]
    Exists(PathBuf),
    /// The target has no folder or name.
    #[error("{0} is not a file path")]
    BadPath(PathBuf),
    /// An I/O error.
    #[error("disk-export to {path}: {op}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// The image's size, in bytes.
    pub bytes: u64,
    /// Granules of the private level written over the image's copy.
    pub granules: u64,
}

/// A private disk's committed content, taken with the device locked.
pub struct ExportSource {
    image: File,
    image_path: PathBuf,
    size: u64,
    level: LevelMap,
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |source| ExportError::Io { path, op, source }
}

impl ExportSource {
    /// The committed content of `disk`: its image and a copy of its
    /// private level.
    pub fn take(disk: &BlockHandle) -> Result<Self, ExportError> {
        let t = lock(disk.transport());
        let d = t.device().disk();
        let image_path = d.base().path().to_path_buf();
        if !d.private() {
            return Err(ExportError::NotPrivate(image_path));
        }
        let image = d
            .base()
            .file()
            .try_clone()
            .map_err(io_err(&image_path, "dup"))?;
        Ok(Self {
            image,
            size: d.size(),
            level: d.levels()[0].clone(),
            image_path,
        })
    }

    /// Writes the content to the new file `to`.
    pub fn write(self, to: &Path) -> Result<Exported, ExportError> {
        let name = to
            .file_name()
            .ok_or_else(|| ExportError::BadPath(to.to_path_buf()))?;
        let dir = to
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .ok_or_else(|| ExportError::BadPath(to.to_path_buf()))?;
        if to.symlink_metadata().is_ok() {
            return Err(ExportError::Exists(to.to_path_buf()));
        }
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".specvm-export-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        // From here the temporary file is ours: removed on any error.
        let r = self.fill(&out, &tmp).and_then(|n| {
            out.sync_all().map_err(io_err(&tmp, "fsync"))?;
            std::fs::hard_link(&tmp, to).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ExportError::Exists(to.to_path_buf()),
                _ => ExportError::Io {
                    path: to.to_path_buf(),
                    op: "link",
                    source: e,
                },
            })?;
            Ok(n)
        });
        let _ = std::fs::remove_file(&tmp);
        let n = r?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "fsync folder"))?;
        Ok(n)
    }

    /// Copies the image into `out`, then the private level over it.
    fn fill(&self, out: &File, out_path: &Path) -> Result<Exported, ExportError> {
        copy_range(&self.image, out, self.size).map_err(io_err(&self.image_path, "copy"))?;
        out.set_len(self.size)
            .map_err(io_err(out_path, "truncate"))?;
        let zeros = vec![0u8; GRANULE as usize];
        for (&g, granule) in &self.level {
            let at = g * GRANULE;
            let n = (self.size - at).min(GRANULE) as usize;
            let bytes = match granule {
                Granule::Zero => &zeros[..n],
                Granule::Data(d) => &d[..n],
            };
            out.write_all_at(bytes, at)
                .map_err(io_err(out_path, "write"))?;
        }
        Ok(Exported {
            bytes: self.size,
            granules: self.level.len() as u64,
        })
    }
}

/// Copies `len` bytes from the start of `from` to the start of `to` with
/// copy_file_range(2), which lets the kernel share or clone extents where
/// the file system can (std's `io::copy` uses it too, but only from the
/// files' current positions, which a shared descriptor must not move), and
/// falls back to reads and writes where the call is not supported.
fn copy_range(from: &File, to: &File, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = done as libc::loff_t;
        let mut off_out = done as libc::loff_t;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open files owned by the caller, and
        // the offsets are valid pointers to locals.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    return copy_plain(from, to, done, len);
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the image ended at byte {done} of {len}"),
            ));
        }
        done += n as u64;
    }
    Ok(())
}

/// The fallback of [`copy_range`]: positioned reads and writes from `at`.
fn copy_plain(from: &File, to: &File, mut at: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], at)?;
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("specvm-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn source(dir: &Path, image: &[u8], level: LevelMap) -> ExportSource {
        let p = dir.join("base.img");
        std::fs::write(&p, image).unwrap();
        ExportSource {
            image: File::open(&p).unwrap(),
            image_path: p,
            size: image.len() as u64,
            level,
        }
    }

    #[test]
    fn writes_the_image_with_the_private_level_over_it() {
        let dir = tmpdir("over");
        let image: Vec<u8> = (0..4 * GRANULE as usize).map(|i| (i % 251) as u8).collect();
        let mut level = LevelMap::new();
        level.insert(1, Granule::Data(vec![7u8; GRANULE as usize].into()));
        level.insert(3, Granule::Zero);
        let out = dir.join("out.img");
        let n = source(&dir, &image, level).write(&out).unwrap();
        assert_eq!(n.granules, 2);
        assert_eq!(n.bytes, image.len() as u64);
        let got = std::fs::read(&out).unwrap();
        let g = GRANULE as usize;
        let mut want = image.clone();
        want[g..2 * g].fill(7);
        want[3 * g..].fill(0);
        assert_eq!(got, want);
        // No temporary file is left.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_granule_past_a_short_end_is_cut() {
        let dir = tmpdir("short");
        // 1.5 granules: the second one is half inside the disk.
        let image = vec![1u8; GRANULE as usize * 3 / 2];
        let mut level = LevelMap::new();
        level.insert(1, Granule::Data(vec![9u8; GRANULE as usize].into()));
        let out = dir.join("out.img");
        source(&dir, &image, level).write(&out).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), image.len());
        assert!(got[GRANULE as usize..].iter().all(|&b| b == 9));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        let dir = tmpdir("exists");
        let out = dir.join("mine.img");
        std::fs::write(&out, b"the user's").unwrap();
        let e = source(&dir, &[0u8; 512], LevelMap::new())
            .write(&out)
            .unwrap_err();
        assert!(matches!(e, ExportError::Exists(_)), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the user's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_folder_is_an_error_and_leaves_nothing() {
        let dir = tmpdir("nofolder");
        let out = dir.join("no/such/out.img");
        let e = source(&dir, &[0u8; 512], LevelMap::new())
            .write(&out)
            .unwrap_err();
        assert!(matches!(e, ExportError::Io { op: "create", .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
