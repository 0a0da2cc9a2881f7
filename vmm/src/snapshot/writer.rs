//! Writing a snapshot directory, the way a database writes its files.
//!
//! - **One writer.** A writer holds an exclusive `flock` on `DIR/lock` from
//!   before it reads the committed state until it has committed or cleaned
//!   up; a second one gets [`SnapshotError::Busy`] at once.
//! - **New names, then a rename.** Each snapshot writes its memory layer
//!   under a name no earlier snapshot used (`memory-<new id>`) and its state
//!   under `state-<new id>.new`, syncs both, renames the state over `state`
//!   (the commit point) and syncs the directory. The layer needs no rename
//!   of its own: until the state that names it is committed, nothing reads
//!   it, and the directory sync that makes the new `state` durable makes
//!   the layer's name durable too.
//! - **Delete only what the manifest names.** The committed state lists the
//!   layers it owns. Before it creates a file, a writer records in the lock
//!   file (its *journal*) every name it will create and every layer the
//!   commit may make unused, synced; after a crash, the next writer deletes
//!   those of them that the committed state does not name. No other file is
//!   ever deleted, whatever its name.
//! - **Failures leave nothing.** A failed write (a full disk) removes the
//!   files it created before it returns the error; the previous snapshot
//!   stays whole.
//!
//! The lock file is the one file written in place, under a fixed name: a
//! lock must keep its name and inode, or two writers could lock two files.
//! Its journal is checksummed, and is written before the files it names
//! exist, so a torn journal names nothing that was created.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::MmapRegion;
use xxhash_rust::xxh3::xxh3_64;

use super::files::{io_err, open_regular, read_state_bytes, STATE};
use super::layer::{chunks, ChunkBuf, Layer, LayerBuilder};
use super::source::MemorySource;
use super::{codec, memory_name, SnapshotError, VmSnapshot};
use crate::vstate::memory::PAGE_SIZE;

/// The lock file's name in a snapshot directory.
pub const LOCK: &str = "lock";
const JOURNAL_HEAD: &str = "specvm snapshot journal 1";
const PAGE: u64 = PAGE_SIZE as u64;

/// The committed snapshot a writer found in the directory.
pub struct Committed {
    /// The state, if it is one this build can restore.
    pub snap: Option<VmSnapshot>,
    /// The files it owns, if it is a specvm state file whose layer list
    /// can be read (this format version or the previous one); None for
    /// none or a damaged one, whose files are then never deleted.
    names: Option<Vec<String>>,
}

/// A snapshot directory, locked for writing one snapshot.
pub struct DirWriter {
    dir: PathBuf,
    lock: File,
    committed: Committed,
    /// Names from a crashed writer's journal that could not be settled
    /// (the committed state was unreadable): kept in the journal.
    leftover: Vec<String>,
    /// Files this writer created and has not committed: removed if it
    /// fails.
    created: Vec<PathBuf>,
    /// The snapshot id whose names the journal holds.
    journaled: Option<u64>,
}

impl DirWriter {
    /// Locks `dir` (which must exist) for writing, settles what a crashed
    /// writer left, and reads the committed state. Refuses a directory
    /// whose `state` is not a specvm state file: specvm does not replace
    /// files it did not write.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let lock = lock(dir)?;
        let committed = committed(dir)?;
        let mut w = Self {
            dir: dir.into(),
            lock,
            committed,
            leftover: Vec::new(),
            created: Vec::new(),
            journaled: None,
        };
        let journal = read_journal(&w.lock);
        match &w.committed.names {
            Some(names) => {
                for n in journal.iter().filter(|n| !names.contains(n)) {
                    remove_own(&w.dir.join(n));
                }
            }
            None => w.leftover = journal,
        }
        Ok(w)
    }

    /// The committed snapshot, if this build can read it.
    pub fn committed(&self) -> Option<&VmSnapshot> {
        self.committed.snap.as_ref()
    }

    /// Writes `src`'s first `len` bytes (guest memory) as the full layer
    /// of snapshot `id`, holes left as holes, synced.
    pub fn write_full(
        &mut self,
        src: &MemorySource<'_>,
        len: u64,
        id: u64,
    ) -> Result<Layer, SnapshotError> {
        let extents = src
            .extents(len)
            .map_err(io_err("reading guest memory", &self.dir))?;
        self.write_layer(src, len, id, extents)
    }

    /// Writes the diff layer of snapshot `id`: a sparse file of `len` bytes
    /// holding only the `pages` (sorted) of `src`, synced. Earlier layers
    /// are not touched, so its cost follows the number of pages.
    pub fn write_diff(
        &mut self,
        src: &MemorySource<'_>,
        len: u64,
        pages: &[u64],
        id: u64,
    ) -> Result<Layer, SnapshotError> {
        let extents = crate::spec::memory::runs(pages)
            .into_iter()
            .map(|r| (r.start * PAGE, (r.end - r.start) * PAGE))
            .collect();
        self.write_layer(src, len, id, extents)
    }

    fn write_layer(
        &mut self,
        src: &MemorySource<'_>,
        len: u64,
        id: u64,
        extents: Vec<(u64, u64)>,
    ) -> Result<Layer, SnapshotError> {
        self.begin(id)?;
        let path = self.dir.join(memory_name(id));
        let out = self.create(&path, "creating the snapshot memory file")?;
        direct_io(&out);
        out.set_len(len)
            .map_err(io_err("sizing the snapshot memory file", &path))?;
        let mut b = LayerBuilder::new(id, extents.clone());
        copy_chunks(src, &out, &extents, &mut b).map_err(|(what, err)| SnapshotError::Io {
            what,
            path: path.clone(),
            err,
        })?;
        out.sync_all()
            .map_err(io_err("syncing the snapshot memory file", &path))?;
        Ok(b.finish())
    }

    /// Commits `snap` as the directory's snapshot: writes and syncs
    /// `state-<id>.new`, renames it to `state`, syncs the directory, then
    /// deletes the layers the replaced state owned that `snap` does not.
    pub fn commit(mut self, snap: &VmSnapshot) -> Result<(), SnapshotError> {
        self.begin(snap.id)?;
        let new = self.dir.join(state_new_name(snap.id));
        let mut f = self.create(&new, "creating the snapshot state file")?;
        f.write_all(&snap.encode())
            .map_err(io_err("writing the snapshot state file", &new))?;
        f.sync_all()
            .map_err(io_err("syncing the snapshot state file", &new))?;
        let state = self.dir.join(STATE);
        std::fs::rename(&new, &state)
            .map_err(io_err("renaming the snapshot state file", &state))?;
        // Committed (in memory at least): the new files belong to `state`
        // now, and must not be removed even if the sync below fails.
        self.created.clear();
        sync_dir(&self.dir)?;
        let keep: Vec<String> = snap.layers.iter().map(|l| memory_name(l.id)).collect();
        for n in self.committed.names.iter().flatten() {
            if !keep.contains(n) {
                remove_own(&self.dir.join(n));
            }
        }
        // A journal left in place is harmless (the next writer deletes
        // only what the state does not name, and finds the rest gone), so
        // clearing it needs no sync.
        let clear = if self.leftover.is_empty() {
            self.lock.set_len(0)
        } else {
            write_journal(&self.lock, &self.leftover)
        };
        if let Err(e) = clear {
            tracing::warn!(
                "clearing the snapshot journal in {}: {e}",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Records, synced, every name snapshot `id` may leave behind: its own
    /// files, the layers the committed state owns (a commit may make them
    /// unused), and the leftovers of a crashed writer. Done once per id,
    /// before any of its files is created; the controller calls it before
    /// it pauses the VM, so the VM does not wait for this sync.
    pub fn begin(&mut self, id: u64) -> Result<(), SnapshotError> {
        if self.journaled == Some(id) {
            return Ok(());
        }
        let mut names = self.leftover.clone();
        names.extend(self.committed.names.iter().flatten().cloned());
        names.push(memory_name(id));
        names.push(state_new_name(id));
        names.sort();
        names.dedup();
        let lock = self.dir.join(LOCK);
        write_journal(&self.lock, &names)
            .and_then(|()| self.lock.sync_data())
            .map_err(io_err("writing the snapshot journal", &lock))?;
        self.journaled = Some(id);
        Ok(())
    }

    /// Creates `path`, which must not exist, and remembers it for removal
    /// if the snapshot fails.
    fn create(&mut self, path: &Path, what: &'static str) -> Result<File, SnapshotError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(io_err(what, path))?;
        self.created.push(path.into());
        Ok(f)
    }
}

#[cfg(test)]
impl DirWriter {
    /// Ends the writer as a crash would: its files stay, its lock goes.
    pub(super) fn crash(mut self) {
        self.created.clear();
    }
}

impl Drop for DirWriter {
    /// A writer that did not commit removes what it created: a partial
    /// layer of a full disk must not fill it further, nor stay behind.
    fn drop(&mut self) {
        for p in self.created.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!("removing the unfinished snapshot file {}: {e}", p.display());
            }
        }
    }
}

/// A write on its way to the disk.
enum Chunk<'a> {
    /// Guest memory in place: written straight from its mapping.
    Mapped(&'a [u8]),
    /// Guest memory copied into a buffer of huge pages ([`Bounce`]).
    Bounced(Bounce),
    /// Copied into a buffer (a chunk whose bytes lie in more than one
    /// mapping, or in a file read with `pread`).
    Copied(ChunkBuf),
}

/// The most guest memory written in place by one write: the chunks that
/// follow each other in one mapping and in the layer are joined up to
/// this. Fewer, larger writes were a little quicker here (full snapshots
/// of filled memory, 1 MiB against 8 MiB writes, runs alternated):
/// 118-143 against 116-134 ms at 256 MiB, 504-555 against 457-511 ms at
/// 1 GiB. The disk's noise is as large as the gain, so the case for it
/// is mostly the 8x fewer system calls.
const MAX_WRITE: usize = 8 << 20;

/// A buffer of [`MAX_WRITE`] bytes on transparent huge pages, where the
/// host gives them, that guest memory is copied into before it is written
/// with `O_DIRECT`.
///
/// Why a copy: a direct write hands the disk a list of physical memory
/// segments, and a request holds only so many (254 here, a common limit
/// of virtio-blk and NVMe queues). Guest memory is in 4 KiB pages
/// scattered in physical memory, so each request carries about 1 MiB; a
/// huge-page buffer is contiguous 2 MiB at a time, so the same segments
/// carry the request's whole size, and the kernel also pins 512 times
/// fewer pages. Writing 1 GiB with `O_DIRECT` and `fsync` in 8 MiB writes
/// took 229-236 ms from huge pages against 323-451 ms from 4 KiB pages
/// (alternated, best of two each); the copy costs CPU time, which the
/// writing thread's wait on the disk hides. `docs/benchmarks/snapshot.md`
/// has the snapshots' figures.
struct Bounce {
    region: MmapRegion,
    /// Where the 2 MiB-aligned buffer starts in `region`.
    skip: usize,
    len: usize,
}

impl Bounce {
    const HUGE_PAGE: usize = 2 << 20;
    /// The shortest run of guest memory worth the copy.
    const WORTH: usize = 1 << 20;

    /// A new buffer, or `None` if it cannot be mapped (then guest memory
    /// is written in place).
    fn new() -> Option<Self> {
        let region = MmapRegionBuilder::new(MAX_WRITE + Self::HUGE_PAGE)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .ok()?;
        let skip = region.as_ptr().align_offset(Self::HUGE_PAGE);
        // SAFETY: the range lies inside the mapping, which `region` owns;
        // MADV_HUGEPAGE only changes how its pages are allocated, and a
        // host without transparent huge pages refuses it harmlessly.
        unsafe {
            libc::madvise(
                region.as_ptr().add(skip).cast(),
                MAX_WRITE,
                libc::MADV_HUGEPAGE,
            );
        }
        Some(Self {
            region,
            skip,
            len: 0,
        })
    }

    /// Empties the buffer.
    fn clear(&mut self) {
        self.len = 0;
    }

    /// Copies `bytes` after what the buffer holds, and returns the copy.
    /// The caller keeps the total within [`MAX_WRITE`] (a [`Run`] never
    /// grows past it); past it, the copy would stop short.
    fn append(&mut self, bytes: &[u8]) -> &[u8] {
        debug_assert!(bytes.len() <= MAX_WRITE - self.len, "a run past MAX_WRITE");
        let n = bytes.len().min(MAX_WRITE - self.len);
        // SAFETY: `skip + len + n` lies inside the mapping (`skip` is less
        // than a huge page past its start, and it is that much longer than
        // MAX_WRITE), which only this buffer uses, and `&mut self` makes
        // this the only access to it.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.region.as_ptr().add(self.skip + self.len), n)
        };
        dst.copy_from_slice(&bytes[..n]);
        self.len += n;
        dst
    }

    /// What the buffer holds.
    fn bytes(&self) -> &[u8] {
        // SAFETY: as in `fill`; the bytes were written by it.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().add(self.skip), self.len) }
    }
}

/// Copies `extents` of `src` into the same places of `out`, recording each
/// piece's checksum in `b`. A second thread writes while this one copies
/// and checksums what comes next: the disk works while the CPU does, and
/// with `O_DIRECT` each write takes as long as the disk does.
///
/// Chunks that lie in one mapping of guest memory and follow each other
/// are gathered into a run of up to [`MAX_WRITE`] bytes (the vCPUs are
/// paused, so the mapping holds still). A run of at least
/// [`Bounce::WORTH`] is copied into a huge-page [`Bounce`] buffer, chunk by
/// chunk, each checksummed from its copy while it is still in the cache;
/// a shorter one is written in place. Other chunks are read into one of
/// three [`ChunkBuf`]s. Buffers go round between the two threads. An
/// error names the side that failed.
fn copy_chunks<'a>(
    src: &MemorySource<'a>,
    out: &File,
    extents: &[(u64, u64)],
    b: &mut LayerBuilder,
) -> Result<(), (&'static str, std::io::Error)> {
    const BUFFERS: usize = 3;
    std::thread::scope(|scope| {
        let (to_disk, written) = std::sync::mpsc::sync_channel::<(u64, Chunk<'a>)>(BUFFERS);
        let (give_back, spare) = std::sync::mpsc::channel::<ChunkBuf>();
        let (bounce_back, spare_bounces) = std::sync::mpsc::channel::<Bounce>();
        let writer = scope.spawn(move || -> std::io::Result<()> {
            for (off, chunk) in written {
                match chunk {
                    Chunk::Mapped(bytes) => out.write_all_at(bytes, off)?,
                    Chunk::Bounced(buf) => {
                        out.write_all_at(buf.bytes(), off)?;
                        // The reader may have stopped: then the buffer
                        // just goes.
                        let _ = bounce_back.send(buf);
                    }
                    Chunk::Copied(buf) => {
                        out.write_all_at(buf.bytes(), off)?;
                        let _ = give_back.send(buf);
                    }
                }
            }
            Ok(())
        });
        let mut run = Run {
            to_disk: &to_disk,
            spare: spare_bounces,
            made: 0,
            start: 0,
            bytes: &[],
            chunks: Vec::new(),
        };
        let mut made = 0;
        let mut read_err = None;
        for (off, n) in chunks(extents) {
            // O_DIRECT needs page-aligned memory; mappings are.
            let in_place = src
                .mapped(off, n)
                .filter(|b| b.as_ptr().align_offset(PAGE as usize) == 0);
            if let Some(bytes) = in_place {
                let longer = (run.end() == Some(off) && run.bytes.len() + n <= MAX_WRITE)
                    .then(|| src.mapped(run.start, run.bytes.len() + n))
                    .flatten();
                match longer {
                    Some(l) => run.bytes = l,
                    None => {
                        if !run.send(b) {
                            break;
                        }
                        (run.start, run.bytes) = (off, bytes);
                    }
                }
                run.chunks.push((off, n));
                continue;
            }
            if !run.send(b) {
                break;
            }
            let mut buf = match spare.try_recv() {
                Ok(buf) => buf,
                Err(_) if made < BUFFERS => {
                    made += 1;
                    ChunkBuf::new()
                }
                // None comes back once the writer has stopped (it failed).
                Err(_) => match spare.recv() {
                    Ok(buf) => buf,
                    Err(_) => break,
                },
            };
            match buf.read(src, off, n) {
                Ok(bytes) => b.chunk(off, bytes),
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
            if to_disk.send((off, Chunk::Copied(buf))).is_err() {
                break;
            }
        }
        if read_err.is_none() {
            run.send(b);
        }
        drop(run);
        drop(to_disk);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writing thread panicked")));
        if let Some(e) = read_err {
            return Err(("reading guest memory", e));
        }
        wrote.map_err(|e| ("writing the snapshot memory file", e))
    })
}

/// The run of chunks of one mapping that [`copy_chunks`] gathers before
/// it sends them to the writing thread as one write.
struct Run<'s, 'a> {
    to_disk: &'s std::sync::mpsc::SyncSender<(u64, Chunk<'a>)>,
    /// Bounce buffers back from the writing thread.
    spare: std::sync::mpsc::Receiver<Bounce>,
    made: usize,
    /// Where the run starts in the layer, and its bytes in the mapping.
    start: u64,
    bytes: &'a [u8],
    /// Its chunks, whose checksums are not taken yet.
    chunks: Vec<(u64, usize)>,
}

impl Run<'_, '_> {
    /// Buffers at most, enough for the writing thread never to wait.
    const BOUNCES: usize = 4;

    /// Where the run ends in the layer; `None` when it is empty.
    fn end(&self) -> Option<u64> {
        (!self.bytes.is_empty()).then(|| self.start + self.bytes.len() as u64)
    }

    /// A buffer to copy into: one back from the writing thread, a new one,
    /// or, with [`Run::BOUNCES`] out, the next that comes back. `None`
    /// when none can be had (the run is then written in place).
    fn bounce(&mut self) -> Option<Bounce> {
        match self.spare.try_recv() {
            Ok(buf) => Some(buf),
            Err(_) if self.made < Self::BOUNCES => {
                self.made += 1;
                Bounce::new()
            }
            // None comes back once the writing thread has stopped.
            Err(_) => self.spare.recv().ok(),
        }
    }

    /// Checksums the run's chunks into `b` and sends the run, copied or in
    /// place; false if the writing thread has stopped.
    fn send(&mut self, b: &mut LayerBuilder) -> bool {
        if self.bytes.is_empty() {
            return true;
        }
        let (start, bytes) = (self.start, std::mem::take(&mut self.bytes));
        let bounce = match bytes.len() >= Bounce::WORTH {
            true => self.bounce(),
            false => None,
        };
        let chunk = match bounce {
            Some(mut buf) => {
                buf.clear();
                for &(off, n) in &self.chunks {
                    let at = (off - start) as usize;
                    b.chunk(off, buf.append(&bytes[at..at + n]));
                }
                Chunk::Bounced(buf)
            }
            None => {
                for &(off, n) in &self.chunks {
                    let at = (off - start) as usize;
                    b.chunk(off, &bytes[at..at + n]);
                }
                Chunk::Mapped(bytes)
            }
        };
        self.chunks.clear();
        self.to_disk.send((start, chunk)).is_ok()
    }
}

/// Has writes to `f` bypass the page cache (`O_DIRECT`), where its file
/// system allows it; else they stay buffered, and the `fsync` that follows
/// every layer makes them durable all the same.
///
/// A layer is written once and read back only at a restore, so caching it
/// buys nothing, and on this host filling fresh page-cache pages is what
/// made a full snapshot slow: `perf` put half of a 256 MiB create in the
/// kernel's copy into new cache pages, and `dd` wrote the same 224 MiB in
/// 136-156 ms with `oflag=direct` against 376-682 ms buffered and synced
/// (`docs/benchmarks/snapshot.md`). The writes qualify: the chunks of
/// [`ChunkBuf`] are page-aligned in memory, and a layer's extents are
/// whole pages, so every offset and length is a multiple of 4 KiB.
fn direct_io(f: &File) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on an open descriptor change only its
    // status flags; a file system without O_DIRECT refuses the F_SETFL
    // (EINVAL) and the descriptor stays as it was.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT);
        }
    }
}

/// `state-<id>.new`: the state file of snapshot `id` before its commit.
fn state_new_name(id: u64) -> String {
    format!("state-{id:016x}.new")
}

/// Whether `name` is one specvm gives the files it writes and deletes:
/// `memory-<16 hex digits>` or `state-<16 hex digits>.new`. A journal
/// naming anything else is not one specvm wrote.
fn is_own_name(name: &str) -> bool {
    let hex = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    name.strip_prefix("memory-").is_some_and(hex)
        || name
            .strip_prefix("state-")
            .and_then(|s| s.strip_suffix(".new"))
            .is_some_and(hex)
}

/// Deletes `path`, a file specvm's journal or manifest names, if it is a
/// regular file (never a directory, nor through a symbolic link).
fn remove_own(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_file() => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("removing the stale snapshot file {}: {e}", path.display());
            }
        }
        Ok(_) => tracing::warn!(
            "not removing {}: it is not a regular file, so not specvm's",
            path.display()
        ),
        Err(_) => {}
    }
}

/// Opens (creating it if needed) and locks `dir/lock`.
fn lock(dir: &Path) -> Result<File, SnapshotError> {
    let path = dir.join(LOCK);
    let open = |create_new: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
    };
    let f = match open(true) {
        Ok(f) => {
            // The journal it will hold must survive a crash.
            sync_dir(dir)?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Not followed if it is a link, nor blocked on if a FIFO.
            open_regular(&path, "opening the snapshot lock file")?;
            open(false).map_err(io_err("opening the snapshot lock file", &path))?
        }
        Err(e) => return Err(io_err("creating the snapshot lock file", &path)(e)),
    };
    if !f
        .metadata()
        .map_err(io_err("opening the snapshot lock file", &path))?
        .is_file()
    {
        return Err(SnapshotError::NotRegular {
            path,
            kind: "not a regular file".into(),
        });
    }
    // SAFETY: flock on a descriptor we own; it takes no pointers.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SnapshotError::Busy { dir: dir.into() });
        }
        return Err(io_err("locking the snapshot directory", &path)(err));
    }
    Ok(f)
}

/// The committed state of `dir`, and the names it owns.
fn committed(dir: &Path) -> Result<Committed, SnapshotError> {
    let path = dir.join(STATE);
    let bytes = match read_state_bytes(&path) {
        Ok(b) => b,
        Err(SnapshotError::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Committed {
                snap: None,
                names: Some(Vec::new()),
            })
        }
        Err(SnapshotError::Corrupt(_)) => {
            return Err(foreign(&path, "it is larger than any state file"))
        }
        Err(e @ SnapshotError::NotRegular { .. }) => return Err(foreign(&path, &e.to_string())),
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(&codec::MAGIC) {
        return Err(foreign(&path, "it is not a specvm snapshot state file"));
    }
    let names = codec::manifest_layers(&bytes)
        .map(|ids| ids.into_iter().map(memory_name).collect::<Vec<_>>());
    if names.is_none() {
        tracing::warn!(
            "{} is a damaged specvm state file: it is replaced, and the memory files it named are left in place",
            path.display()
        );
    }
    Ok(Committed {
        snap: VmSnapshot::decode(&bytes).ok(),
        names,
    })
}

fn foreign(path: &Path, why: &str) -> SnapshotError {
    SnapshotError::Refused(format!(
        "{} is in the way: {why}; specvm replaces only a state file it wrote",
        path.display()
    ))
}

/// The names in the journal of `lock`: none if it is empty, torn or not
/// one specvm wrote.
pub(crate) fn read_journal(lock: &File) -> Vec<String> {
    let mut buf = Vec::new();
    let len = lock.metadata().map_or(0, |m| m.len());
    if len == 0 || len > 1 << 20 {
        return buf;
    }
    let mut text = vec![0u8; len as usize];
    if lock.read_exact_at(&mut text, 0).is_err() {
        return buf;
    }
    let Ok(text) = String::from_utf8(text) else {
        return buf;
    };
    let Some((body, sum)) = text.trim_end_matches('\n').rsplit_once('\n') else {
        return buf;
    };
    let body = format!("{body}\n");
    if sum != format!("xxh3 {:016x}", xxh3_64(body.as_bytes())) {
        tracing::warn!("the snapshot journal is torn or not specvm's; ignored");
        return buf;
    }
    let mut lines = body.lines();
    if lines.next() != Some(JOURNAL_HEAD) {
        return buf;
    }
    for l in lines {
        if !is_own_name(l) {
            tracing::warn!("the snapshot journal names {l:?}, not a specvm file; ignored");
            return Vec::new();
        }
        buf.push(l.to_string());
    }
    buf
}

/// Writes `names` as the journal in `lock`, in place.
fn write_journal(lock: &File, names: &[String]) -> std::io::Result<()> {
    let mut body = format!("{JOURNAL_HEAD}\n");
    for n in names {
        body.push_str(n);
        body.push('\n');
    }
    let text = format!("{body}xxh3 {:016x}\n", xxh3_64(body.as_bytes()));
    lock.write_all_at(text.as_bytes(), 0)?;
    lock.set_len(text.len() as u64)
}

/// Syncs `dir`, so the names created, renamed or removed in it last.
pub fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the snapshot directory", dir))
}
