//! The speculative disk: a base image under a stack of in-memory overlays,
//! one per open checkpoint, free of KVM and of virtio so it can be tested
//! against a model on its own.
//!
//! - Level `i` (0 = outermost) holds the writes made while checkpoint `i`
//!   was the newest one. Reads look from the top level down to the base.
//! - [`SpecDisk::push_level`] at `speculate()`, [`SpecDisk::rollback_to`]
//!   at an abort (drops levels, no I/O), [`SpecDisk::fold`] at a commit:
//!   level `i` merges into level `i - 1`, or, for level 0, is written to
//!   the base, which is then synced. Only that outermost fold writes the
//!   base; with no level open, writes go straight to it.
//! - The map is per [`GRANULE`] (4 KiB): a guest's page cache and file
//!   systems write whole 4 KiB blocks, so one entry per block written keeps
//!   the map 8 times smaller than per-sector entries would; a write of
//!   part of a granule that the top level does not hold yet first reads the
//!   granule through the levels below (read-modify-write).
//! - Costs follow the granules written, never the disk's size: a level is
//!   a `BTreeMap` of the granules it holds; pushing is O(1), a rollback
//!   frees the popped levels' entries, a fold moves the smaller of the two
//!   maps into the larger one (or writes level 0's entries to the base).
//! - Flush is output: inside a speculation it is complete at once (nothing
//!   uncommitted may reach the base); at depth 0 it syncs the base.

use std::collections::BTreeMap;
use std::io;

/// Bytes in a sector, the unit of virtio-blk addresses.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes in a granule, the unit the overlays track.
pub const GRANULE: u64 = 4096;
/// What a granule of zeros (a discard) costs against the overlay budget:
/// its map entry.
const ZERO_ENTRY_COST: u64 = 64;
/// What a granule of data costs: its bytes and its map entry.
const DATA_ENTRY_COST: u64 = GRANULE + ZERO_ENTRY_COST;
/// Largest piece written to the base at once at depth 0 for a discard.
const ZERO_CHUNK: usize = 64 << 10;

/// Where the base image's bytes are read and written: a file for the
/// device, memory in tests.
pub trait BaseIo {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Makes every write so far durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// Errors of the speculative disk.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// An access past the end of the disk, or whose end overflows.
    #[error("access of {len} bytes at offset {offset} is past the disk's end ({size} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The disk's size in bytes.
        size: u64,
    },
    /// A write or discard on a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The overlays would hold more than their budget.
    #[error("the speculative overlays would exceed their budget of {limit} bytes")]
    Full {
        /// The budget in bytes.
        limit: u64,
    },
    /// A level call named a level that is not open.
    #[error("level {level} is not open (depth {depth})")]
    NoLevel {
        /// The level asked for.
        level: usize,
        /// Levels open.
        depth: usize,
    },
    /// The base image failed.
    #[error("base image {op} at offset {offset}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// The error.
        source: io::Error,
    },
}

/// The content of a granule in an overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granule {
    /// Discarded: reads as zeros.
    Zero,
    /// Written: [`GRANULE`] bytes (past the disk's end, zeros that are
    /// never read nor written back).
    Data(Box<[u8]>),
}

impl Granule {
    fn cost(&self) -> u64 {
        match self {
            Granule::Zero => ZERO_ENTRY_COST,
            Granule::Data(_) => DATA_ENTRY_COST,
        }
    }
}

/// One level: the granules written while its checkpoint was the newest.
pub type LevelMap = BTreeMap<u64, Granule>;

/// Counters of what the disk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes (and discards) that went to the base image.
    pub base_writes: u64,
    /// Syncs of the base image.
    pub base_syncs: u64,
    /// Flushes completed without I/O because a speculation was open.
    pub flushes_absorbed: u64,
    /// Granules written to the base by outermost folds.
    pub granules_folded_to_base: u64,
    /// Granules dropped by rollbacks.
    pub granules_rolled_back: u64,
}

/// A base image under a stack of overlays (see the module documentation).
pub struct SpecDisk<B> {
    base: B,
    size: u64,
    read_only: bool,
    levels: Vec<LevelMap>,
    /// Levels at the bottom of `levels` that no checkpoint owns: 1 in
    /// private mode (`levels[0]` is the private level, which takes the
    /// writes made at depth 0 and is never written back), else 0.
    floor: usize,
    /// Budget charged by the granules held in all levels.
    held: u64,
    limit: u64,
    stats: DiskStats,
}

/// The piece of granule `g` that a byte range covers.
struct Piece {
    granule: u64,
    /// Offset in the granule.
    start: usize,
    /// Offset in the caller's buffer.
    at: usize,
    len: usize,
}

/// The granule pieces of `[offset, offset + len)`, in order.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let start = (pos % GRANULE) as usize;
        let n = (GRANULE as usize - start).min(len - at);
        let p = Piece {
            granule: pos / GRANULE,
            start,
            at,
            len: n,
        };
        at += n;
        Some(p)
    })
}

impl<B: BaseIo> SpecDisk<B> {
    /// A disk of `size` bytes over `base`, with no level open; overlays
    /// may hold up to `limit` bytes (data plus entry costs).
    pub fn new(base: B, size: u64, read_only: bool, limit: u64) -> Self {
        Self {
            base,
            size,
            read_only,
            levels: Vec::new(),
            floor: 0,
            held: 0,
            limit,
            stats: DiskStats::default(),
        }
    }

    /// A disk like [`SpecDisk::new`]'s in *private* mode: the base is
    /// never written. A bottom level that no checkpoint owns takes every
    /// write made with no speculation open, and the outermost commit
    /// folds into it; it lives as long as the disk (and goes into
    /// snapshots), and its writes are lost when the disk is dropped. A
    /// flush at depth 0 completes at once. The private level counts
    /// against `limit` like the others.
    pub fn new_private(base: B, size: u64, read_only: bool, limit: u64) -> Self {
        let mut d = Self::new(base, size, read_only, limit);
        d.levels.push(LevelMap::new());
        d.floor = 1;
        d
    }

    /// Whether the disk is in private mode (see [`SpecDisk::new_private`]).
    pub fn private(&self) -> bool {
        self.floor == 1
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The base image.
    pub fn base(&self) -> &B {
        &self.base
    }

    /// Levels open (checkpoints the disk follows); the private level is
    /// not one of them.
    pub fn depth(&self) -> usize {
        self.levels.len() - self.floor
    }

    /// The levels, outermost first: the private level first in private
    /// mode, then one per open checkpoint.
    pub fn levels(&self) -> &[LevelMap] {
        &self.levels
    }

    /// Budget used by the overlays, in bytes.
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    /// The counters.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(OverlayError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        if self.read_only {
            return Err(OverlayError::ReadOnly);
        }
        self.check(offset, len)
    }

    /// Reads `buf.len()` bytes at `offset`, as the guest sees them.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.check(offset, buf.len() as u64)?;
        self.read_below(self.levels.len(), offset, buf)
    }

    /// Reads through levels `[0, top)` and the base. Runs of granules that
    /// no level holds are read from the base in one call.
    fn read_below(&self, top: usize, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        let levels = &self.levels[..top];
        // The pending base run: (offset in buf, length).
        let mut run: Option<(usize, usize)> = None;
        for p in pieces(offset, buf.len()) {
            let hit = levels.iter().rev().find_map(|l| l.get(&p.granule));
            let dst = &mut buf[p.at..p.at + p.len];
            match hit {
                None => {
                    run = Some(match run {
                        Some((at, len)) => (at, len + p.len),
                        None => (p.at, p.len),
                    });
                    continue;
                }
                Some(Granule::Zero) => dst.fill(0),
                Some(Granule::Data(d)) => dst.copy_from_slice(&d[p.start..p.start + p.len]),
            }
            if let Some((at, len)) = run.take() {
                self.read_base(offset + at as u64, &mut buf[at..at + len])?;
            }
        }
        if let Some((at, len)) = run {
            self.read_base(offset + at as u64, &mut buf[at..at + len])?;
        }
        Ok(())
    }

    fn read_base(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.base
            .read_at(buf, offset)
            .map_err(|source| OverlayError::Io {
                op: "read",
                offset,
                source,
            })
    }

    /// Granule `g` as the levels below `top` and the base show it; the
    /// bytes past the disk's end are zero.
    fn granule_below(&self, top: usize, g: u64) -> Result<Box<[u8]>, OverlayError> {
        let mut d = vec![0u8; GRANULE as usize].into_boxed_slice();
        let start = g * GRANULE;
        let n = (self.size - start).min(GRANULE) as usize;
        self.read_below(top, start, &mut d[..n])?;
        Ok(d)
    }

    /// Writes `data` at `offset`: into the top level, or into the base
    /// when no level is open.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        self.check_writable(offset, data.len() as u64)?;
        if self.levels.is_empty() {
            self.stats.base_writes += 1;
            return self
                .base
                .write_at(data, offset)
                .map_err(|source| OverlayError::Io {
                    op: "write",
                    offset,
                    source,
                });
        }
        self.reserve(offset, data.len(), true)?;
        for p in pieces(offset, data.len()) {
            let d = self.top_data(p.granule, p.start == 0 && p.len == GRANULE as usize)?;
            d[p.start..p.start + p.len].copy_from_slice(&data[p.at..p.at + p.len]);
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros (a discard).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), OverlayError> {
        self.check_writable(offset, len)?;
        if self.levels.is_empty() {
            self.stats.base_writes += 1;
            return self
                .base
                .write_zeroes(offset, len)
                .map_err(|source| OverlayError::Io {
                    op: "discard",
                    offset,
                    source,
                });
        }
        // Within the disk's size, so it fits in usize on 64-bit hosts.
        let len = usize::try_from(len).map_err(|_| OverlayError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        self.reserve(offset, len, false)?;
        for p in pieces(offset, len) {
            let whole =
                p.start == 0 && (p.len == GRANULE as usize || self.ends_disk(p.granule, p.len));
            if whole {
                self.put_top(p.granule, Granule::Zero);
            } else {
                self.top_data(p.granule, false)?[p.start..p.start + p.len].fill(0);
            }
        }
        Ok(())
    }

    /// Whether a piece of `len` bytes from the start of granule `g`
    /// reaches the disk's end (the last granule may be short).
    fn ends_disk(&self, g: u64, len: usize) -> bool {
        g * GRANULE + len as u64 == self.size
    }

    /// Refuses a change of `[offset, offset + len)` if the entries it adds
    /// to the top level (data granules if `data`, else zero ones) would
    /// exceed the budget. Counts whole entries, so it may refuse a change
    /// that the granules already held would have absorbed in part.
    fn reserve(&self, offset: u64, len: usize, data: bool) -> Result<(), OverlayError> {
        let top = self.levels.last();
        let (cost, needs) = if data {
            let f: fn(Option<&Granule>) -> bool = |e| !matches!(e, Some(Granule::Data(_)));
            (DATA_ENTRY_COST, f)
        } else {
            let f: fn(Option<&Granule>) -> bool = |e| e.is_none();
            (ZERO_ENTRY_COST, f)
        };
        let new = pieces(offset, len)
            .filter(|p| needs(top.and_then(|l| l.get(&p.granule))))
            .count() as u64;
        if self.held.saturating_add(new.saturating_mul(cost)) > self.limit {
            return Err(OverlayError::Full { limit: self.limit });
        }
        Ok(())
    }

    fn put_top(&mut self, g: u64, v: Granule) {
        let cost = v.cost();
        let Some(top) = self.levels.last_mut() else {
            return;
        };
        if let Some(old) = top.insert(g, v) {
            self.held -= old.cost();
        }
        self.held += cost;
    }

    /// The top level's data for granule `g`, made from the levels below
    /// unless `overwrite` says the caller replaces all of it.
    fn top_data(&mut self, g: u64, overwrite: bool) -> Result<&mut [u8], OverlayError> {
        let top = self.levels.len() - 1;
        let has_data = matches!(self.levels[top].get(&g), Some(Granule::Data(_)));
        if !has_data {
            let fresh = match (overwrite, self.levels[top].get(&g)) {
                (true, _) | (false, Some(Granule::Zero)) => {
                    vec![0u8; GRANULE as usize].into_boxed_slice()
                }
                _ => self.granule_below(top, g)?,
            };
            self.put_top(g, Granule::Data(fresh));
        }
        match self.levels[top].get_mut(&g) {
            Some(Granule::Data(d)) => Ok(d),
            // Put there just above.
            _ => unreachable!("granule {g} was just made data"),
        }
    }

    /// Completes a guest FLUSH: syncs the base at depth 0; inside a
    /// speculation nothing may reach the base, so it is done at once.
    pub fn flush(&mut self) -> Result<(), OverlayError> {
        if !self.levels.is_empty() {
            self.stats.flushes_absorbed += 1;
            return Ok(());
        }
        self.sync_base()
    }

    /// Syncs the base if this disk writes it (not private, no level
    /// open); else does nothing.
    pub fn sync_shared_base(&mut self) -> Result<(), OverlayError> {
        if self.private() || !self.levels.is_empty() {
            return Ok(());
        }
        self.sync_base()
    }

    fn sync_base(&mut self) -> Result<(), OverlayError> {
        self.stats.base_syncs += 1;
        self.base.sync().map_err(|source| OverlayError::Io {
            op: "sync",
            offset: 0,
            source,
        })
    }

    /// A checkpoint was taken: opens a level; returns its index (the
    /// checkpoint's, which does not count the private level).
    pub fn push_level(&mut self) -> usize {
        self.levels.push(LevelMap::new());
        self.depth() - 1
    }

    /// An abort restored checkpoint `level`: drops levels `level..`. No
    /// I/O. `level` may equal the depth (nothing to drop).
    pub fn rollback_to(&mut self, level: usize) -> Result<(), OverlayError> {
        let depth = self.depth();
        if level > depth {
            return Err(OverlayError::NoLevel { level, depth });
        }
        for l in self.levels.drain(level + self.floor..) {
            self.stats.granules_rolled_back += l.len() as u64;
            self.held -= l.values().map(Granule::cost).sum::<u64>();
        }
        Ok(())
    }

    /// Checkpoint `level` was committed: its level merges into the one
    /// below; level 0's granules are written to the base, which is then
    /// synced (in private mode, into the private level instead: the base
    /// is never written). Levels above stay. On an error the levels are
    /// unchanged (the base may hold part of level 0, which reads the same).
    pub fn fold(&mut self, level: usize) -> Result<(), OverlayError> {
        let depth = self.depth();
        if level >= depth {
            return Err(OverlayError::NoLevel { level, depth });
        }
        // From here on, `level` indexes `levels`.
        let level = level + self.floor;
        if level == 0 {
            self.write_back(0)?;
            let l = self.levels.remove(0);
            self.held -= l.values().map(Granule::cost).sum::<u64>();
            return Ok(());
        }
        let upper = self.levels.remove(level);
        let lower = &mut self.levels[level - 1];
        let mut dropped = 0u64;
        if upper.len() >= lower.len() {
            // Move the smaller map: keep the upper's value where both
            // hold a granule.
            let older = std::mem::replace(lower, upper);
            for (g, v) in older {
                match lower.entry(g) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(v);
                    }
                    std::collections::btree_map::Entry::Occupied(_) => dropped += v.cost(),
                }
            }
        } else {
            for (g, v) in upper {
                if let Some(old) = lower.insert(g, v) {
                    dropped += old.cost();
                }
            }
        }
        self.held -= dropped;
        Ok(())
    }

    /// Writes level `level`'s granules to the base and syncs it.
    /// Contiguous data granules go out in one write.
    fn write_back(&mut self, level: usize) -> Result<(), OverlayError> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let size = self.size;
        let mut count = 0u64;
        for (&g, v) in &self.levels[level] {
            let start = g * GRANULE;
            let n = (size - start).min(GRANULE);
            if !run.is_empty() && (run_start + run.len() as u64 != start || run.len() >= 1 << 20) {
                self.base
                    .write_at(&run, run_start)
                    .map_err(io_err("write", run_start))?;
                run.clear();
            }
            match v {
                Granule::Data(d) => {
                    if run.is_empty() {
                        run_start = start;
                    }
                    run.extend_from_slice(&d[..n as usize]);
                }
                Granule::Zero => {
                    if !run.is_empty() {
                        self.base
                            .write_at(&run, run_start)
                            .map_err(io_err("write", run_start))?;
                        run.clear();
                    }
                    self.base
                        .write_zeroes(start, n)
                        .map_err(io_err("discard", start))?;
                }
            }
            count += 1;
        }
        if !run.is_empty() {
            self.base
                .write_at(&run, run_start)
                .map_err(io_err("write", run_start))?;
        }
        self.stats.base_writes += count;
        self.stats.granules_folded_to_base += count;
        self.sync_base()
    }

    /// Replaces every level (restoring a snapshot of the overlays); each
    /// granule must lie within the disk and data granules must be
    /// [`GRANULE`] bytes. In private mode the saved levels are merged,
    /// newest granule first, into the private level, and no checkpoint
    /// level is open after. Nothing changes on an error.
    pub fn set_levels(&mut self, levels: Vec<LevelMap>) -> Result<(), OverlayError> {
        let levels = if self.private() {
            let mut merged = LevelMap::new();
            for l in levels {
                merged.extend(l);
            }
            vec![merged]
        } else {
            levels
        };
        let mut held = 0u64;
        for (&g, v) in levels.iter().flatten() {
            let bad_len = matches!(v, Granule::Data(d) if d.len() != GRANULE as usize);
            if g.checked_mul(GRANULE).is_none_or(|s| s >= self.size) || bad_len {
                return Err(OverlayError::OutOfRange {
                    offset: g.saturating_mul(GRANULE),
                    len: GRANULE,
                    size: self.size,
                });
            }
            held += v.cost();
        }
        self.levels = levels;
        self.held = held;
        Ok(())
    }
}

/// The error maker for a failed base operation.
fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> OverlayError {
    move |source| OverlayError::Io { op, offset, source }
}
