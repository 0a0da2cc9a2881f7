//! Reading the snapshot directory: the state file and the memory layers.
//!
//! Only regular files are read: every file is opened without following a
//! symbolic link (`O_NOFOLLOW`) and without blocking (`O_NONBLOCK`, so a
//! FIFO cannot hang the open), and checked with `fstat` before a byte is
//! read; its size is checked against what it may hold first. Writing the
//! directory is [`super::writer`]'s.
//!
//! Copies skip holes (`SEEK_DATA`/`SEEK_HOLE`): guest memory never touched
//! is a hole in the memfd, and stays one in the snapshot and in the memfd
//! a restore fills, so both cost in proportion to the memory the guest has
//! used, not to its size.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::codec::{HEADER_LEN, MAX_PAYLOAD};
use super::{memory_name, SnapshotError, VmSnapshot};

/// The state file's name in a snapshot directory.
pub const STATE: &str = "state";
/// Bytes copied per system call.
const CHUNK: usize = 1 << 20;

pub(super) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |err| SnapshotError::Io { what, path, err }
}

/// Opens `path` for reading if it is a regular file: not through a
/// symbolic link, and without blocking on a FIFO. Returns the file and its
/// size.
pub fn open_regular(path: &Path, what: &'static str) -> Result<(File, u64), SnapshotError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| {
            if err.raw_os_error() == Some(libc::ELOOP) {
                not_regular(path, "a symbolic link")
            } else {
                SnapshotError::Io {
                    what,
                    path: path.into(),
                    err,
                }
            }
        })?;
    let md = f.metadata().map_err(io_err(what, path))?;
    let t = md.file_type();
    if !t.is_file() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(not_regular(path, kind));
    }
    Ok((f, md.len()))
}

fn not_regular(path: &Path, kind: &str) -> SnapshotError {
    SnapshotError::NotRegular {
        path: path.into(),
        kind: kind.into(),
    }
}

/// The bytes of the state file at `path`, checked to be a regular file no
/// larger than any state file before it is read.
pub fn read_state_bytes(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let (f, len) = open_regular(path, "opening the snapshot state file")?;
    let max = HEADER_LEN as u64 + MAX_PAYLOAD;
    if len > max {
        return Err(SnapshotError::Corrupt(format!(
            "{} is {len} bytes, larger than any state file",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take`: a file that grows while it is read is still read no further
    // than the largest state file (and then refused as corrupt).
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("reading the snapshot state file", path))?;
    Ok(buf)
}

/// Reads and checks `dir/state`. A file that is not a valid state file of
/// this format version is refused whole.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    VmSnapshot::decode(&read_state_bytes(&dir.join(STATE))?)
}

/// Opens every memory layer of `snap` in `dir`, oldest first, checking
/// that each is a regular file of the memory's size.
pub fn open_layers(dir: &Path, snap: &VmSnapshot) -> Result<Vec<(PathBuf, File)>, SnapshotError> {
    let mut layers = Vec::with_capacity(snap.layers.len());
    for l in &snap.layers {
        let path = dir.join(memory_name(l.id));
        let (src, len) = open_regular(&path, "opening the snapshot memory file")?;
        if len != snap.mem_size {
            return Err(SnapshotError::Corrupt(format!(
                "{} is {len} bytes, the state says {}",
                path.display(),
                snap.mem_size
            )));
        }
        layers.push((path, src));
    }
    Ok(layers)
}

/// Copies the data of `src`'s first `len` bytes to the same offsets of
/// `dst`, skipping holes.
pub fn copy_data(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (p, k) in data_chunks(src, len)? {
        src.read_exact_at(&mut buf[..k], p)?;
        dst.write_all_at(&buf[..k], p)?;
    }
    Ok(())
}

/// The data of `f`'s first `len` bytes ([`data_runs`]) as (offset, length)
/// pieces of at most 1 MiB, in order: the units of [`copy_data`].
pub fn data_chunks(f: &File, len: u64) -> std::io::Result<Vec<(u64, usize)>> {
    let mut out = Vec::new();
    for (start, n) in data_runs(f, len)? {
        let mut p = start;
        while p < start + n {
            let k = ((start + n - p) as usize).min(CHUNK);
            out.push((p, k));
            p += k as u64;
        }
    }
    Ok(out)
}

/// The runs of data (offset, length) in `f`'s first `len` bytes: what
/// `SEEK_DATA`/`SEEK_HOLE` report, so holes are never read.
pub fn data_runs(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < len {
        let Some(data) = seek(f, off, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push((data, hole - data));
        off = hole;
    }
    Ok(out)
}

/// `lseek(fd, off, whence)`; `None` where SEEK_DATA finds no more data.
fn seek(f: &File, off: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor we own; it changes only the
    // file's position, which nothing else here relies on (all I/O is
    // positioned).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}
