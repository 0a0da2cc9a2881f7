//! The base image: a raw file read and written with `pread`/`pwrite`
//! ([`FileExt`]), its checks at open, and its identity for snapshots.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use super::overlay::{BaseIo, OverlayError, SECTOR_SIZE};
use crate::devices::virtio::VirtioError;

/// Bytes hashed at each end of the image for its identity.
pub const IDENTITY_SAMPLE: u64 = 64 << 10;

/// Errors of the block device outside the guest's requests.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image does not exist.
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    /// The image cannot be opened for writing.
    #[error("disk image {path} is not writable ({source}); add `,readonly` to use it read-only")]
    NotWritable {
        /// The image.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The image is not a regular file.
    #[error("disk image {0} is not a regular file")]
    NotRegular(PathBuf),
    /// The image's size is not whole sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another I/O error on the image.
    #[error("disk image {path}: {op}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The image changed since a snapshot of its overlays was taken.
    #[error("disk image {path} changed since the snapshot: {what}")]
    Identity {
        /// The image.
        path: PathBuf,
        /// What differs, saved and current values.
        what: String,
    },
    /// A saved state does not fit this device.
    #[error("virtio-blk state: {0}")]
    State(String),
    /// The speculative overlays refused an operation.
    #[error("disk image {path}: {source}")]
    Overlay {
        /// The image.
        path: PathBuf,
        /// Why.
        source: OverlayError,
    },
    /// The transport could not be set up.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
}

/// What identifies the base image's contents: checked when overlays saved
/// in a snapshot are put back over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
    /// Inode number.
    pub ino: u64,
    /// XXH3-64 of the first and last [`IDENTITY_SAMPLE`] bytes: catches a
    /// replaced image whose times were copied along.
    pub sample_hash: u64,
}

impl BaseIdentity {
    /// The differences from `now`, or `None` if they match.
    pub fn diff(&self, now: &BaseIdentity) -> Option<String> {
        let mut what = Vec::new();
        if self.size != now.size {
            what.push(format!("size {} then, {} now", self.size, now.size));
        }
        if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
            what.push(format!(
                "mtime {}.{:09} then, {}.{:09} now",
                self.mtime_sec, self.mtime_nsec, now.mtime_sec, now.mtime_nsec
            ));
        }
        if self.ino != now.ino {
            what.push(format!("inode {} then, {} now", self.ino, now.ino));
        }
        if self.sample_hash != now.sample_hash {
            what.push(format!(
                "sampled content hash {:016x} then, {:016x} now",
                self.sample_hash, now.sample_hash
            ));
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

/// A raw image file.
#[derive(Debug)]
pub struct FileBase {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileBase {
    /// Opens `path`, read-write unless `read_only`, and checks that it is a
    /// regular file of whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let p = || path.to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => BlockError::NotFound(p()),
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem if !read_only => {
                    BlockError::NotWritable {
                        path: p(),
                        source: e,
                    }
                }
                _ => BlockError::Io {
                    path: p(),
                    op: "open",
                    source: e,
                },
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Io {
            path: p(),
            op: "stat",
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotRegular(p()));
        }
        let size = meta.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::BadSize { path: p(), size });
        }
        Ok(Self {
            file,
            path: p(),
            size,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image's size at open, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's identity now.
    pub fn identity(&self) -> Result<BaseIdentity, BlockError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| BlockError::Io { path, op, source }
        };
        let meta = self.file.metadata().map_err(io("stat"))?;
        let size = meta.len();
        let mut h = Xxh3::new();
        let head = size.min(IDENTITY_SAMPLE);
        let tail_start = size.saturating_sub(IDENTITY_SAMPLE).max(head);
        for (start, end) in [(0, head), (tail_start, size)] {
            let mut buf = vec![0u8; (end - start) as usize];
            self.file
                .read_exact_at(&mut buf, start)
                .map_err(io("read"))?;
            h.update(&buf);
        }
        Ok(BaseIdentity {
            size,
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
            sample_hash: h.digest(),
        })
    }
}

impl BaseIo for FileBase {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(ErrorKind::InvalidInput));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its integer arguments; the file
        // descriptor is open and owned by `self.file` for the call.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), mode, o, l) };
        if r == 0 {
            return Ok(());
        }
        // A file system without hole punching: write the zeros.
        let mut done = 0u64;
        let zeros = vec![0u8; 64 << 10];
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn open_errors_name_the_path_and_value() {
        let dir = TempDir::new("blk-backend-open");
        let missing = dir.join("nope.img");
        let e = FileBase::open(&missing, false).unwrap_err();
        assert!(matches!(e, BlockError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("nope.img"), "{e}");

        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = FileBase::open(&odd, true).unwrap_err();
        assert!(
            e.to_string().contains("odd.img") && e.to_string().contains("1000"),
            "{e}"
        );

        let e = FileBase::open(dir.path(), true).unwrap_err();
        assert!(
            matches!(e, BlockError::NotRegular(_) | BlockError::Io { .. }),
            "{e}"
        );
    }

    #[test]
    fn unwritable_image_is_refused_unless_read_only() {
        let dir = TempDir::new("blk-backend-ro");
        let img = dir.join("ro.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let mut perm = std::fs::metadata(&img).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
        std::fs::set_permissions(&img, perm).unwrap();
        // Root may write anyway; the refusal is only checkable otherwise.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let e = FileBase::open(&img, false).unwrap_err();
            assert!(matches!(e, BlockError::NotWritable { .. }), "{e}");
            assert!(e.to_string().contains("ro.img"), "{e}");
        }
        let b = FileBase::open(&img, true).unwrap();
        assert_eq!(b.size(), 4096);
    }

    #[test]
    fn punched_ranges_read_as_zero_and_identity_tracks_changes() {
        let dir = TempDir::new("blk-backend-zero");
        let img = dir.join("z.img");
        std::fs::write(&img, vec![0xaau8; 3 << 16]).unwrap();
        let mut b = FileBase::open(&img, false).unwrap();
        let id = b.identity().unwrap();
        assert_eq!(id.diff(&b.identity().unwrap()), None);
        b.write_zeroes(1000, 5000).unwrap();
        let mut buf = vec![0u8; 7000];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|&x| x == 0xaa));
        assert!(buf[1000..6000].iter().all(|&x| x == 0));
        assert!(buf[6000..].iter().all(|&x| x == 0xaa));
        let d = id.diff(&b.identity().unwrap()).expect("content changed");
        assert!(d.contains("sampled content hash"), "{d}");
    }
}
