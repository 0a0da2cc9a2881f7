//! The snapshot directory on disk: the state file, the memory files, and
//! the order of writes that keeps the previous snapshot intact through a
//! crash at any point.
//!
//! A new snapshot first writes its memory layer under a name no earlier
//! snapshot used (`memory-<new id>`), then `state.new`, each synced; then
//! renames `state.new` over `state` (the commit point) and syncs the
//! directory; then deletes the memory files the state no longer names.
//!
//! Copies skip holes (`SEEK_DATA`/`SEEK_HOLE`): guest memory never touched
//! is a hole in the memfd, and stays one in the snapshot and in the memfd
//! a restore fills, so both cost in proportion to the memory the guest has
//! used, not to its size.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{HEADER_LEN, MAX_PAYLOAD};
use super::{memory_name, SnapshotError, VmSnapshot};
use crate::vstate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
/// The state file's name in a snapshot directory.
pub const STATE: &str = "state";
const STATE_NEW: &str = "state.new";
/// Bytes copied per system call.
const CHUNK: usize = 1 << 20;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |err| SnapshotError::Io { what, path, err }
}

/// Reads and checks `dir/state`. A file that is not a valid state file of
/// this format version is refused whole.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE);
    let f = File::open(&path).map_err(io_err("opening the snapshot state file", &path))?;
    let len = f
        .metadata()
        .map_err(io_err("reading the snapshot state file", &path))?
        .len();
    if len > HEADER_LEN as u64 + MAX_PAYLOAD {
        return Err(SnapshotError::Corrupt(format!(
            "{} is {len} bytes, larger than any state file",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut &f, &mut buf)
        .map_err(io_err("reading the snapshot state file", &path))?;
    VmSnapshot::decode(&buf)
}

/// Writes `src`'s first `len` bytes (the guest memory file) to
/// `dir/memory-<id>`, and syncs it.
pub fn write_memory_full(dir: &Path, src: &File, len: u64, id: u64) -> Result<(), SnapshotError> {
    let path = dir.join(memory_name(id));
    let out = create_new(&path)?;
    out.set_len(len)
        .map_err(io_err("sizing the snapshot memory file", &path))?;
    copy_data(src, &out, len).map_err(io_err("writing the snapshot memory file", &path))?;
    out.sync_all()
        .map_err(io_err("syncing the snapshot memory file", &path))
}

/// Writes the diff layer `dir/memory-<id>`: a sparse file of `len` bytes
/// holding only the `pages` of `src`, and syncs it. Earlier layers are
/// not touched, so its cost follows the number of pages.
pub fn write_memory_diff(
    dir: &Path,
    src: &File,
    len: u64,
    pages: &[u64],
    id: u64,
) -> Result<(), SnapshotError> {
    let path = dir.join(memory_name(id));
    let out = create_new(&path)?;
    out.set_len(len)
        .map_err(io_err("sizing the snapshot memory file", &path))?;
    let mut buf = vec![0u8; CHUNK];
    for run in runs(pages) {
        let mut p = run.start;
        while p < run.end {
            let n = (run.end - p).min((CHUNK / PAGE_SIZE) as u64);
            let b = &mut buf[..(n * PAGE) as usize];
            let off = p * PAGE;
            src.read_exact_at(b, off)
                .map_err(io_err("reading guest memory", &path))?;
            out.write_all_at(b, off)
                .map_err(io_err("writing the snapshot memory file", &path))?;
            p += n;
        }
    }
    out.sync_all()
        .map_err(io_err("syncing the snapshot memory file", &path))
}

/// Commits `snap` as the snapshot in `dir`: writes and syncs `state.new`,
/// renames it to `state`, syncs the directory, then removes every memory
/// file but the layers `snap` names.
pub fn commit_state(dir: &Path, snap: &VmSnapshot) -> Result<(), SnapshotError> {
    let new = dir.join(STATE_NEW);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&new)
        .map_err(io_err("creating the snapshot state file", &new))?;
    f.write_all(&snap.encode())
        .map_err(io_err("writing the snapshot state file", &new))?;
    f.sync_all()
        .map_err(io_err("syncing the snapshot state file", &new))?;
    let state = dir.join(STATE);
    std::fs::rename(&new, &state).map_err(io_err("renaming the snapshot state file", &state))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the snapshot directory", dir))?;
    let keep: Vec<String> = snap.layers.iter().map(|&l| memory_name(l)).collect();
    remove_stale_memory(dir, &keep);
    Ok(())
}

/// Deletes the memory files of snapshots no longer committed (the
/// previous one, or one whose commit a crash interrupted).
fn remove_stale_memory(dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("memory-") && !keep.iter().any(|k| *k == name) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!("removing the stale snapshot file {name}: {err}");
            }
        }
    }
}

/// Copies the memory layers of `snap` in `dir`, oldest first, into `dst`,
/// which must be `snap.mem_size` bytes of holes (a fresh memfd). Every
/// layer is opened and checked before any is copied.
pub fn load_memory(dir: &Path, snap: &VmSnapshot, dst: &File) -> Result<(), SnapshotError> {
    for (path, src) in open_layers(dir, snap)? {
        copy_data(&src, dst, snap.mem_size)
            .map_err(io_err("reading the snapshot memory file", &path))?;
    }
    Ok(())
}

/// Opens every memory layer of `snap` in `dir`, oldest first, checking
/// that each is there and of the memory's size.
pub fn open_layers(dir: &Path, snap: &VmSnapshot) -> Result<Vec<(PathBuf, File)>, SnapshotError> {
    let mut layers = Vec::with_capacity(snap.layers.len());
    for &l in &snap.layers {
        let path = dir.join(memory_name(l));
        let src = File::open(&path).map_err(io_err("opening the snapshot memory file", &path))?;
        let len = src
            .metadata()
            .map_err(io_err("reading the snapshot memory file", &path))?
            .len();
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

fn create_new(path: &PathBuf) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating the snapshot memory file", path))
}

/// Copies the data of `src`'s first `len` bytes to the same offsets of
/// `dst`, skipping holes.
pub fn copy_data(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (start, n) in data_runs(src, len)? {
        let mut p = start;
        while p < start + n {
            let k = ((start + n - p) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..k], p)?;
            dst.write_all_at(&buf[..k], p)?;
            p += k as u64;
        }
    }
    Ok(())
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

use crate::spec::memory::runs;
