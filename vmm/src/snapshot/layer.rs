//! What the state file records of each memory layer, and the checks made
//! against it: where the layer holds data (its *extents*), and an XXH3-64
//! checksum of every *piece* of them, a piece being the part of an extent
//! inside one aligned [`SUM_CHUNK`] window of the file.
//!
//! A base (full) layer is mapped as guest memory, so the guest sees all of
//! it: its extents must hold exactly the recorded bytes, and everything else
//! must read as zeros (a hole, or data that is all zero). A diff layer is
//! applied by copying its extents over the base; nothing else in it is ever
//! read. Checksums per 64 KiB chunk, not per file, so a check reads only
//! what the guest wrote (holes are skipped), the state file grows by 8
//! bytes per 64 KiB of written memory (128 KiB for 1 GiB), and an error
//! names the damaged 64 KiB.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::codec::{Reader, Writer};
use super::files::data_runs;
use super::SnapshotError;
use crate::vstate::memory::PAGE_SIZE;

/// Bytes covered by one checksum at most: the window size, in file
/// offsets, that pieces are cut at.
pub const SUM_CHUNK: u64 = 64 << 10;
/// Bytes read per system call when checking or copying a layer (a multiple
/// of [`SUM_CHUNK`]).
pub const IO_CHUNK: usize = 1 << 20;
const PAGE: u64 = PAGE_SIZE as u64;

/// One memory layer as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The id of the snapshot that wrote it (its file is
    /// [`super::memory_name`] of it).
    pub id: u64,
    /// Where it holds data: (file offset, length), page-aligned, sorted,
    /// not overlapping.
    pub extents: Vec<(u64, u64)>,
    /// XXH3-64 of every piece of the extents, in file order.
    pub sums: Vec<u64>,
}

/// The pieces of `extents`: each extent cut where a [`SUM_CHUNK`] window
/// ends.
pub fn pieces(extents: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    extents
        .iter()
        .flat_map(|&(start, len)| run_pieces(start, len))
}

/// The pieces of one run of `len` bytes at `start`.
fn run_pieces(start: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut p = start;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let e = ((p / SUM_CHUNK + 1) * SUM_CHUNK).min(end);
        let piece = (p, e - p);
        p = e;
        Some(piece)
    })
}

/// Calls `f(offset, bytes)` for every piece of `extents` in `file`, in
/// order, reading up to [`IO_CHUNK`] bytes per call.
pub fn read_pieces(
    file: &File,
    extents: &[(u64, u64)],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    on_io: impl Fn(io::Error) -> SnapshotError,
) -> Result<(), SnapshotError> {
    read_chunks(
        file,
        extents,
        |p, b| chunk_pieces(p, b).try_for_each(|(off, piece)| f(off, piece)),
        on_io,
    )
}

/// The pieces of `bytes`, a chunk read from file offset `off`: each with
/// its own file offset.
fn chunk_pieces(off: u64, bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    run_pieces(off, bytes.len() as u64)
        .map(move |(o, n)| (o, &bytes[(o - off) as usize..(o - off + n) as usize]))
}

/// Calls `f(offset, bytes)` for `extents` in `file`, in order, one read
/// of up to [`IO_CHUNK`] bytes per call, each ending at a [`SUM_CHUNK`]
/// window boundary or an extent's end, so that it holds whole pieces. The
/// chunks are page-aligned in memory, and in the file when the extents are.
pub fn read_chunks(
    file: &File,
    extents: &[(u64, u64)],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    on_io: impl Fn(io::Error) -> SnapshotError,
) -> Result<(), SnapshotError> {
    let mut buf = ChunkBuf::new();
    for (p, n) in chunks(extents) {
        let b = buf.read(file, p, n).map_err(&on_io)?;
        f(p, b)?;
    }
    Ok(())
}

/// The chunks [`read_chunks`] reads: (file offset, length), in order.
pub fn chunks(extents: &[(u64, u64)]) -> impl Iterator<Item = (u64, usize)> + '_ {
    extents.iter().flat_map(|&(start, len)| {
        let end = start + len;
        let mut p = start;
        std::iter::from_fn(move || {
            (p < end).then(|| {
                let stop = ((p + IO_CHUNK as u64) / SUM_CHUNK * SUM_CHUNK).min(end);
                let chunk = (p, (stop - p) as usize);
                p = stop;
                chunk
            })
        })
    })
}

/// What a [`ChunkBuf`] reads from: a file, or guest memory as a snapshot
/// sees it ([`super::source::MemorySource`]).
pub trait ReadAt {
    /// Reads exactly `buf.len()` bytes at `off`.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
}

impl ReadAt for super::source::MemorySource<'_> {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        super::source::MemorySource::read_exact_at(self, buf, off)
    }
}

/// A buffer for one chunk, page-aligned so that a writer may hand it to a
/// file opened with O_DIRECT (see `DirWriter::write_layer`).
pub struct ChunkBuf {
    space: Vec<u8>,
    skip: usize,
    len: usize,
}

impl ChunkBuf {
    /// An empty buffer of [`IO_CHUNK`] bytes.
    pub fn new() -> Self {
        let space = vec![0u8; IO_CHUNK + PAGE as usize];
        let skip = space.as_ptr().align_offset(PAGE as usize);
        Self {
            space,
            skip,
            len: 0,
        }
    }

    /// Reads `n` (at most [`IO_CHUNK`]) bytes of `file` at `off` into the
    /// buffer, and returns them.
    pub fn read(&mut self, file: &impl ReadAt, off: u64, n: usize) -> io::Result<&[u8]> {
        let b = &mut self.space[self.skip..self.skip + n.min(IO_CHUNK)];
        file.read_exact_at(b, off)?;
        self.len = b.len();
        Ok(b)
    }

    /// What the last [`ChunkBuf::read`] read.
    pub fn bytes(&self) -> &[u8] {
        &self.space[self.skip..self.skip + self.len]
    }
}

impl Default for ChunkBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    /// Appends the record to a payload.
    pub fn put(&self, w: &mut Writer) {
        w.u64(self.id);
        w.u32(self.extents.len() as u32);
        for &(off, len) in &self.extents {
            w.u64(off);
            w.u64(len);
        }
        w.u32(self.sums.len() as u32);
        self.sums.iter().for_each(|&s| w.u64(s));
    }

    /// Reads a record that [`Layer::put`] wrote, for memory of `mem_size`
    /// bytes, and checks that its extents are well-formed and that it has
    /// one checksum per piece.
    pub fn get(r: &mut Reader<'_>, mem_size: u64) -> Result<Self, SnapshotError> {
        let id = r.u64("memory layer id")?;
        let n = r.count(16, "memory layer extent count")?;
        let mut extents = Vec::with_capacity(n);
        let mut prev_end = 0;
        for _ in 0..n {
            let (off, len) = (r.u64("extent offset")?, r.u64("extent length")?);
            let end = off.checked_add(len).filter(|&e| e <= mem_size);
            let aligned = off % PAGE == 0 && len % PAGE == 0;
            if end.is_none() || !aligned || len == 0 || off < prev_end {
                return Err(SnapshotError::Corrupt(format!(
                    "memory layer {id:016x}: extent {off:#x}+{len:#x} is not page-aligned, \
                     in order and inside {mem_size:#x} bytes"
                )));
            }
            prev_end = off + len;
            extents.push((off, len));
        }
        let n = r.count(8, "memory layer checksum count")?;
        let want = pieces(&extents).count();
        if n != want {
            return Err(SnapshotError::Corrupt(format!(
                "memory layer {id:016x}: {n} checksums for {want} pieces"
            )));
        }
        let sums = (0..n)
            .map(|_| r.u64("memory layer checksum"))
            .collect::<Result<_, _>>()?;
        Ok(Self { id, extents, sums })
    }

    /// Bytes of data the layer holds.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|&(_, n)| n).sum()
    }

    /// Checks every piece of a diff layer as it is read, and hands it to
    /// `apply(offset, bytes)` only once it matches: damaged data never
    /// reaches guest memory.
    pub fn apply_checked(
        &self,
        file: &File,
        path: &Path,
        mut apply: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), SnapshotError> {
        let mut sums = self.sums.iter();
        read_pieces(
            file,
            &self.extents,
            |off, b| {
                check_piece(path, off, b, sums.next().copied())?;
                apply(off, b).map_err(|err| SnapshotError::Io {
                    what: "writing a snapshot memory layer into guest memory",
                    path: path.into(),
                    err,
                })
            },
            io_err(path),
        )
    }

    /// Checks a base layer whole, as the guest would see it through the
    /// mapping: every piece against its checksum, and every byte outside
    /// the extents that the file holds as data (not as a hole) is zero.
    /// With `spread`, the checksums are checked on up to one thread per CPU
    /// (a restore waits for it); without, on the calling thread only (a
    /// check beside the running guest leaves it the other CPUs). `done`
    /// counts the bytes of the extents checked so far, out of
    /// [`Layer::data_bytes`].
    pub fn check_base(
        &self,
        file: &File,
        path: &Path,
        mem_size: u64,
        spread: bool,
        done: &AtomicU64,
    ) -> Result<(), SnapshotError> {
        let threads = match spread {
            true => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(CHECK_THREADS),
            false => 1,
        };
        self.check_sums_in(file, path, threads, CHECK_PART_MIN, done)?;
        let runs = data_runs(file, mem_size).map_err(io_err(path))?;
        let outside = subtract(&runs, &self.extents);
        read_pieces(
            file,
            &outside,
            |off, b| match b.iter().position(|&x| x != 0) {
                None => Ok(()),
                Some(i) => Err(damaged(
                    path,
                    format!(
                        "it holds data at {:#x}, where the snapshot recorded none",
                        off + i as u64
                    ),
                )),
            },
            io_err(path),
        )
    }

    /// Checks every piece of the extents against its checksum, a large
    /// layer cut into parts at window boundaries, on a thread each (up to
    /// `threads`, parts of at least `min` bytes): hashing a filled guest's
    /// memory is CPU-bound. The error is the first damage in file order, as
    /// a single pass would find.
    fn check_sums_in(
        &self,
        file: &File,
        path: &Path,
        threads: usize,
        min: u64,
        done: &AtomicU64,
    ) -> Result<(), SnapshotError> {
        let parts = split_extents(&self.extents, threads, min);
        let check = |(first, extents): &(usize, Vec<(u64, u64)>)| {
            let mut sums = self.sums.iter().skip(*first);
            read_pieces(
                file,
                extents,
                |off, b| {
                    check_piece(path, off, b, sums.next().copied())?;
                    done.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(())
                },
                io_err(path),
            )
        };
        if parts.len() < 2 {
            return parts.iter().try_for_each(check);
        }
        std::thread::scope(|scope| {
            let running: Vec<_> = parts
                .iter()
                .map(|p| scope.spawn(move || check(p)))
                .collect();
            // Joined in file order: the first error is the lowest damage.
            let results: Vec<_> = running
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotError::Corrupt("the memory check panicked".into()))
                    })
                })
                .collect();
            results.into_iter().collect()
        })
    }
}

/// Most threads one layer's check uses.
const CHECK_THREADS: usize = 4;
/// Fewest bytes worth a thread of their own.
const CHECK_PART_MIN: u64 = 32 << 20;

/// Cuts `extents` into at most `parts` runs of about equal bytes (none
/// under `min` bytes), at [`SUM_CHUNK`] window boundaries, so that each
/// run's pieces are exactly a stretch of the whole's pieces. Returns each
/// run with the index of its first piece.
fn split_extents(extents: &[(u64, u64)], parts: usize, min: u64) -> Vec<(usize, Vec<(u64, u64)>)> {
    let total: u64 = extents.iter().map(|e| e.1).sum();
    let parts = (parts as u64).min(total / min.max(1)).max(1);
    let share = total.div_ceil(parts);
    let mut out = vec![(0, Vec::new())];
    let mut in_part = 0u64;
    let mut first_piece = 0usize;
    for &(start, len) in extents {
        let (mut p, end) = (start, start + len);
        while p < end {
            // Cut where the part is full, moved up to a window boundary.
            let want = p + (share - in_part).max(1);
            let cut = (want.div_ceil(SUM_CHUNK) * SUM_CHUNK).min(end);
            let run = (p, cut - p);
            first_piece += pieces(&[run]).count();
            let part = out.last_mut().expect("never empty");
            part.1.push(run);
            in_part += cut - p;
            p = cut;
            if in_part >= share && out.len() < parts as usize {
                out.push((first_piece, Vec::new()));
                in_part = 0;
            }
        }
    }
    out.retain(|(_, e)| !e.is_empty());
    out
}

/// Builds a layer's record while it is written: feed it every piece, in
/// order.
pub struct LayerBuilder {
    layer: Layer,
}

impl LayerBuilder {
    /// A record for layer `id` holding `extents`.
    pub fn new(id: u64, extents: Vec<(u64, u64)>) -> Self {
        Self {
            layer: Layer {
                id,
                extents,
                sums: Vec::new(),
            },
        }
    }

    /// Records the checksum of the next piece.
    pub fn piece(&mut self, bytes: &[u8]) {
        self.layer.sums.push(xxh3_64(bytes));
    }

    /// Records the checksums of the pieces of `bytes`, read from file
    /// offset `off` (a chunk of [`read_chunks`]).
    pub fn chunk(&mut self, off: u64, bytes: &[u8]) {
        for (_, piece) in chunk_pieces(off, bytes) {
            self.piece(piece);
        }
    }

    /// The finished record.
    pub fn finish(self) -> Layer {
        self.layer
    }
}

fn check_piece(path: &Path, off: u64, b: &[u8], want: Option<u64>) -> Result<(), SnapshotError> {
    let got = xxh3_64(b);
    if want == Some(got) {
        return Ok(());
    }
    Err(damaged(
        path,
        format!(
            "bytes {off:#x}..{:#x} have checksum {got:016x}, the state file recorded {}",
            off + b.len() as u64,
            want.map_or("none".into(), |w| format!("{w:016x}"))
        ),
    ))
}

fn damaged(path: &Path, what: String) -> SnapshotError {
    SnapshotError::Layer {
        path: path.into(),
        what,
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        what: "reading the snapshot memory file",
        path: path.into(),
        err,
    }
}

/// The parts of the sorted ranges `a` that no range of the sorted `b`
/// covers.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut bi = 0;
    for &(start, len) in a {
        let end = start + len;
        let mut p = start;
        while bi < b.len() && b[bi].0 + b[bi].1 <= p {
            bi += 1;
        }
        let mut j = bi;
        while p < end {
            match b.get(j) {
                Some(&(bs, bl)) if bs < end => {
                    if bs > p {
                        out.push((p, bs - p));
                    }
                    p = p.max(bs + bl);
                    j += 1;
                }
                _ => {
                    out.push((p, end - p));
                    p = end;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parts_hold_the_same_pieces_in_order() {
        let extents = vec![
            (0, 3 * SUM_CHUNK + 4096),
            (5 * SUM_CHUNK + 8192, 20 * SUM_CHUNK),
            (40 * SUM_CHUNK, 4096),
        ];
        let all: Vec<_> = pieces(&extents).collect();
        for parts in 1..6 {
            let split = split_extents(&extents, parts, SUM_CHUNK);
            assert!(
                !split.is_empty() && split.len() <= parts,
                "{parts}: {split:?}"
            );
            let mut joined = Vec::new();
            for (first, e) in &split {
                assert_eq!(*first, joined.len(), "{parts}: {split:?}");
                joined.extend(pieces(e));
            }
            assert_eq!(joined, all, "{parts} parts");
        }
        // Too little data for more than one part.
        assert_eq!(split_extents(&extents, 4, 1 << 40).len(), 1);
        assert!(split_extents(&[], 4, 1).is_empty());
    }

    #[test]
    fn a_check_in_parts_finds_the_first_damage() {
        /// Removes the test's folder, also when an assertion fails.
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("specvm-check-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _gone = Gone(dir.clone());
        let path = dir.join("layer");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        // 16 windows of data in two extents, a hole between them.
        let extents = vec![(0, 6 * SUM_CHUNK), (8 * SUM_CHUNK, 10 * SUM_CHUNK)];
        for &(start, len) in &extents {
            let data: Vec<u8> = (0..len).map(|i| ((start + i) % 251) as u8).collect();
            file.write_all_at(&data, start).unwrap();
        }
        let mut b = LayerBuilder::new(1, extents.clone());
        read_chunks(
            &file,
            &extents,
            |off, bytes| {
                b.chunk(off, bytes);
                Ok(())
            },
            io_err(&path),
        )
        .unwrap();
        let layer = b.finish();
        assert_eq!(layer.data_bytes(), 16 * SUM_CHUNK);
        for threads in [1, 2, 4] {
            let done = AtomicU64::new(0);
            layer
                .check_sums_in(&file, &path, threads, SUM_CHUNK, &done)
                .unwrap();
            assert_eq!(done.into_inner(), 16 * SUM_CHUNK, "{threads}: all counted");
        }
        let done = AtomicU64::new(0);
        // Damage in the last part and, lower, in the second: every split
        // reports the lower one.
        file.write_all_at(&[0xff], 16 * SUM_CHUNK + 7).unwrap();
        file.write_all_at(&[0xff], 9 * SUM_CHUNK + 3).unwrap();
        for threads in [1, 2, 4] {
            let e = layer
                .check_sums_in(&file, &path, threads, SUM_CHUNK, &done)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("bytes {:#x}..", 9 * SUM_CHUNK)),
                "{threads}: {e}"
            );
        }
    }

    #[test]
    fn pieces_split_at_windows() {
        let c = SUM_CHUNK;
        let got: Vec<_> =
            pieces(&[(0x1000, 0x1000), (c - 0x1000, 0x3000), (4 * c, 2 * c)]).collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x1000),
                (c - 0x1000, 0x1000),
                (c, 0x2000),
                (4 * c, c),
                (5 * c, c)
            ]
        );
    }

    #[test]
    fn subtract_leaves_what_is_uncovered() {
        let a = [(0, 100), (200, 100)];
        let b = [(10, 10), (50, 170), (290, 5)];
        assert_eq!(
            subtract(&a, &b),
            vec![(0, 10), (20, 30), (220, 70), (295, 5)]
        );
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert!(subtract(&a, &[(0, 400)]).is_empty());
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let l = Layer {
            id: 7,
            extents: vec![(0, 0x2000), (SUM_CHUNK, SUM_CHUNK + 0x1000)],
            sums: vec![1, 2, 3],
        };
        let mut w = Writer::default();
        l.put(&mut w);
        assert_eq!(Layer::get(&mut Reader::new(&w.buf), 1 << 30).unwrap(), l);
        let bad = |l: &Layer, mem: u64| {
            let mut w = Writer::default();
            l.put(&mut w);
            Layer::get(&mut Reader::new(&w.buf), mem)
                .unwrap_err()
                .to_string()
        };
        let mut short = l.clone();
        short.sums.pop();
        assert!(bad(&short, 1 << 30).contains("2 checksums for 3 pieces"));
        assert!(bad(&l, SUM_CHUNK).contains("inside"));
        let mut unaligned = l.clone();
        unaligned.extents[0].1 = 0x1800;
        assert!(bad(&unaligned, 1 << 30).contains("page-aligned"));
        let mut overlapping = l;
        overlapping.extents[1].0 = 0x1000;
        assert!(bad(&overlapping, 1 << 30).contains("in order"));
    }
}
