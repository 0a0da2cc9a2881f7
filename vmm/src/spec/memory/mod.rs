//! Guest memory's one owner for checkpoints: dirty pages, copy-on-write
//! checkpoints and rollbacks, the naive full-copy peer, a restored VM's
//! lazily copied memory, dirty-tracking verification, and the record of
//! pages written since the last snapshot.
//!
//! Guest memory is a `MAP_PRIVATE` mapping of a memfd (see
//! [`crate::vstate::memory`]). The file holds the *flushed* state; a page
//! the guest (or the VMM) wrote since the last flush is a private copy in
//! the mapping, found through KVM's dirty log and vm-memory's bitmap.
//!
//! - **Flush** (at `speculate`): every dirty page is written into the file.
//!   Before a page of the file is overwritten, its old content goes to the
//!   undo log of the newest checkpoint, if that checkpoint has no copy of
//!   the page yet. The private copy stays mapped: the guest writes on into
//!   it, and the file keeps the checkpoint's content.
//! - **Rollback** to checkpoint k: the undo logs from the newest down to k
//!   are written back into the file (the oldest copy of a page wins); then
//!   every page dirty since the last flush, or rewritten from a log, is
//!   copied from the file into its private copy, so the mapping reads the
//!   state at k again (why a copy and not `MADV_DONTNEED`: see
//!   [`MemoryTracker::copy_back`]).
//! - **Commit** folds an undo log into the one below (see
//!   [`crate::spec::stack::Fold`]).
//!
//! Every step costs in proportion to the pages that changed, never to the
//! size of guest memory: KVM's dirty ring lists the written pages (see
//! [`crate::vstate::dirty`]; on hosts without it, a dirty bitmap of one bit
//! per page is read instead), and the VMM's own writes are found through a
//! bitmap that keeps a summary ([`crate::vstate::dirty_bitmap`]).
//!
//! Why this and not userfaultfd write-protection: HOST-KVM.md measured a
//! guest's first write per page at ~5.5 µs here against ~60 µs with
//! userfaultfd, and a revert at ~2.5 µs per page; write-protecting the
//! whole range at each checkpoint also grows with populated memory. The
//! price of this design is the flush at `speculate`, which copies the
//! pages dirtied since the previous flush (see `docs/speculation.md` for
//! the measurements).
//!
//! The controller sees only [`MemoryTracker::checkpoint`],
//! [`MemoryTracker::rollback`] and [`MemoryCheckpoint`] (which folds on
//! commit), and hands [`MemoryTracker::take_since_snapshot`] to the
//! snapshot writer. Every page the dirty log reports is noted for the next
//! snapshot inside the tracker, so no caller can forget to.

use std::fs::File;
use std::io;
use std::time::Duration;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::snapshot::source::MemorySource;
use crate::snapshot::DirtyPages;
use crate::spec::verify::VerifyMode;
use crate::vstate::dirty::{DirtyError, DirtyMethod, KvmDirtyLog};
use crate::vstate::memory::{GuestMemoryMmap, GuestRam, RamLayout, PAGE_SIZE};

mod copier;
mod lazy;
mod pages;
mod undo;

pub use undo::{MemoryCheckpoint, UndoLog};

const PAGE: u64 = PAGE_SIZE as u64;

/// Errors of memory checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// Reading KVM's dirty pages failed.
    #[error("reading the dirty pages: {0}")]
    DirtyLog(#[from] DirtyError),
    /// Reading or writing the memory file failed.
    #[error("guest memory file at offset {0:#x}: {1}")]
    File(u64, io::Error),
    /// madvise failed.
    #[error("dropping guest pages at offset {0:#x}: {1}")]
    Madvise(u64, io::Error),
    /// A restored VM's memory could not be copied from the snapshot.
    #[error("restored memory: copying the snapshot memory: {0}")]
    CopyBase(io::Error),
    /// A restored VM's memory could not be mapped onto its own file.
    #[error("restored memory: mapping the guest memory file: {0}")]
    Remap(io::Error),
    /// `SPECVM_VERIFY_MEMORY` could not read the mappings.
    #[error("verifying guest memory: {0}")]
    Verify(io::Error),
    /// A full-copy rollback was given no full copy to restore.
    #[error("rolling back with no full copy of memory to restore")]
    NoFullCopy,
}

/// How checkpoints save memory, chosen when the tracker is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Copy-on-write: flush dirty pages at a checkpoint, keep undo logs.
    CopyOnWrite,
    /// The naive peer of the benchmarks (`--checkpoint full-copy`): a copy
    /// of all of guest memory per checkpoint. Cannot write snapshots.
    FullCopy,
}

/// Owns guest memory's checkpoint state: finds dirty pages, moves memory
/// between checkpoints, and remembers what changed since the last snapshot.
pub struct MemoryTracker {
    layout: RamLayout,
    /// The host address of each range's mapping, by range index.
    hosts: Vec<*mut u8>,
    file: File,
    /// The whole file, mapped shared: copying a page through it costs a
    /// memcpy, where `pwrite`/`pread` cost a system call per run or page.
    view: vm_memory::MmapRegion,
    mem: GuestMemoryMmap,
    strategy: Strategy,
    /// Pages written since the last snapshot (for diff snapshots).
    since_snapshot: DirtyPages,
    /// Check dirty tracking after every flush and rollback
    /// (`SPECVM_VERIFY_MEMORY`, [`crate::spec::verify`]).
    verify: Option<VerifyMode>,
    /// For a VM restored from a snapshot, until its first checkpoint: the
    /// snapshot's base memory layer, which guest memory still maps.
    lazy_base: Option<File>,
    /// The copy of `lazy_base` into `file`, running ahead of the first
    /// checkpoint.
    base_copy: Option<lazy::BaseCopy>,
    /// How long materializing took, until [`Self::take_materialize_time`].
    materialized_in: Option<Duration>,
    /// How long the last harvest of dirty pages took, until
    /// [`Self::take_harvest_time`].
    harvested_in: Option<Duration>,
    /// KVM's record of the pages the guest writes.
    kvm_log: KvmDirtyLog,
    /// Moves the pages of flushes and copy-backs, with helper threads
    /// when there are many.
    copier: copier::Copier,
    /// Pages a snapshot harvested from the dirty logs without flushing
    /// them (sorted): newer in the guest's mapping than in the file, so
    /// the next harvest returns them again.
    unflushed: Vec<u64>,
}

// SAFETY: the raw host pointers point into mappings owned by `mem`, which
// the tracker holds (and so keeps mapped); all access goes through methods
// that the VMM calls only while every vCPU is paused.
unsafe impl Send for MemoryTracker {}

impl MemoryTracker {
    /// A tracker over `ram`, whose regions are KVM memory slots 0, 1, ...
    /// in the order of its layout. `SPECVM_VERIFY_MEMORY` is read here.
    pub fn new(ram: &GuestRam, strategy: Strategy) -> io::Result<Self> {
        if !ram.layout.describes(&ram.mem) {
            return Err(io::Error::other("guest memory does not follow its layout"));
        }
        let view = vm_memory::mmap::MmapRegionBuilder::new(ram.layout.mem_size() as usize)
            .with_file_offset(vm_memory::FileOffset::new(ram.file.try_clone()?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(io::Error::other)?;
        Ok(Self {
            layout: ram.layout.clone(),
            hosts: ram.mem.iter().map(|r| r.as_ptr()).collect(),
            file: ram.file.try_clone()?,
            view,
            mem: ram.mem.clone(),
            strategy,
            since_snapshot: DirtyPages::default(),
            verify: VerifyMode::from_env(),
            lazy_base: None,
            base_copy: None,
            materialized_in: None,
            harvested_in: None,
            kvm_log: KvmDirtyLog::new(DirtyMethod::Bitmap, None),
            copier: copier::Copier::default(),
            unflushed: Vec::new(),
        })
    }

    /// Reads KVM's dirty pages through `log`, the method the VM was made
    /// with (a new tracker assumes the plain bitmap).
    pub fn set_kvm_log(&mut self, log: KvmDirtyLog) {
        self.kvm_log = log;
    }

    /// The dirty-tracking method in use.
    pub fn dirty_method(&self) -> DirtyMethod {
        self.kvm_log.method()
    }

    /// Whether snapshots can be written from this tracker's memory file:
    /// not with the full-copy strategy, which never flushes into it.
    pub fn supports_snapshots(&self) -> bool {
        self.strategy == Strategy::CopyOnWrite
    }

    /// The layout of guest memory.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Takes a checkpoint of memory. All vCPUs must be paused. Restored
    /// memory is materialized first, the first time ([`Self::set_lazy_base`]).
    ///
    /// Copy-on-write: flushes every dirty page into the memory file, saving
    /// the file's old content in `top`'s undo log (the newest checkpoint's,
    /// if any), and returns the new checkpoint's empty log. Full copy:
    /// returns a copy of all of memory.
    pub fn checkpoint(
        &mut self,
        vm: &VmFd,
        top: Option<&mut MemoryCheckpoint>,
    ) -> Result<MemoryCheckpoint, CowError> {
        self.materialize(vm)?;
        match self.strategy {
            Strategy::FullCopy => Ok(MemoryCheckpoint::full(self.copy_all())),
            Strategy::CopyOnWrite => {
                let dirty = self.take_dirty(vm)?;
                let mut undo = top.and_then(MemoryCheckpoint::undo_mut);
                self.flush(&dirty, undo.as_deref_mut())?;
                self.verify(Moment::Checkpoint(undo))?;
                Ok(MemoryCheckpoint::empty_undo())
            }
        }
    }

    /// Rolls memory back to the last checkpoint of `popped`, which holds
    /// every checkpoint taken since that one, newest first (the order of
    /// [`crate::spec::stack::Rollback::checkpoints`]). All vCPUs must be
    /// paused.
    pub fn rollback<'a>(
        &mut self,
        vm: &VmFd,
        popped: impl IntoIterator<Item = &'a MemoryCheckpoint>,
    ) -> Result<(), CowError> {
        match self.strategy {
            Strategy::FullCopy => {
                let target = popped.into_iter().last().and_then(MemoryCheckpoint::copy);
                self.restore_all(target.ok_or(CowError::NoFullCopy)?)
            }
            Strategy::CopyOnWrite => {
                let dirty = self.take_dirty(vm)?;
                self.copy_back(
                    popped.into_iter().filter_map(MemoryCheckpoint::undo),
                    &dirty,
                )?;
                self.verify(Moment::Rollback)
            }
        }
    }

    /// The pages (numbered in the memory file) written since the last call,
    /// sorted: what the next diff snapshot must hold. Every page the dirty
    /// log reported at a checkpoint, a rollback, a materialization or a
    /// [`Self::prepare_snapshot`] is there; pages written since are not,
    /// so the snapshot writer calls that first.
    pub fn take_since_snapshot(&mut self) -> Vec<u64> {
        self.since_snapshot.take()
    }

    /// Readies memory for a snapshot: materializes restored memory, and
    /// harvests the dirty logs, so [`Self::take_since_snapshot`] is
    /// complete, but flushes nothing: the pages written since the last
    /// flush stay only in the guest's mapping, where
    /// [`Self::snapshot_source`] reads them, and the next checkpoint
    /// flushes them. (Flushing them here copied every such page twice, into
    /// the file and then to the disk: half of a 256 MiB snapshot's time.)
    /// All vCPUs must be paused.
    pub fn prepare_snapshot(&mut self, vm: &VmFd) -> Result<(), CowError> {
        self.materialize(vm)?;
        self.unflushed = self.take_dirty(vm)?;
        Ok(())
    }

    /// Guest memory as it is now, for the snapshot writer: read through
    /// the guest's mapping, holding data where the memory file does and in
    /// the pages written since the last flush. Right after
    /// [`Self::prepare_snapshot`], and only while every vCPU stays paused
    /// and the devices hold their I/O: the source reads guest memory in
    /// place.
    pub fn snapshot_source(&self) -> MemorySource<'_> {
        let maps = self
            .layout
            .ranges()
            .iter()
            .zip(&self.hosts)
            .map(|(r, &host)| {
                // SAFETY: the range's mapping is live as long as `mem`,
                // which `self` holds; the caller has paused everything
                // that writes guest memory.
                (r.file_offset, unsafe {
                    std::slice::from_raw_parts(host.cast_const(), r.size as usize)
                })
            })
            .collect();
        let newer = runs(&self.unflushed)
            .into_iter()
            .map(|r| (r.start * PAGE, (r.end - r.start) * PAGE))
            .collect();
        MemorySource::new(&self.file, maps, newer)
    }

    /// How long the last harvest of dirty pages took, once: for the
    /// controller's statistics.
    pub fn take_harvest_time(&mut self) -> Option<Duration> {
        self.harvested_in.take()
    }
}

/// When [`MemoryTracker::verify`] runs, and what it repairs with.
enum Moment<'a> {
    /// After a flush: missed pages are flushed too, into this log.
    Checkpoint(Option<&'a mut UndoLog>),
    /// After a rollback: missed pages are dropped.
    Rollback,
}

impl MemoryTracker {
    /// With `SPECVM_VERIFY_MEMORY`, looks for guest pages written without
    /// being reported dirty, right after a flush or a rollback, and logs
    /// them; in repair mode, makes them right: a checkpoint flushes them, a
    /// rollback drops them.
    fn verify(&self, at: Moment<'_>) -> Result<(), CowError> {
        let Some(mode) = self.verify else {
            return Ok(());
        };
        let when = match at {
            Moment::Checkpoint(_) => "checkpoint",
            Moment::Rollback => "rollback",
        };
        let missed = self.unreported_pages().map_err(CowError::Verify)?;
        if missed.is_empty() {
            tracing::info!(when, "verify: every written page was reported dirty");
            return Ok(());
        }
        let first: Vec<String> = missed
            .iter()
            .take(32)
            .map(|&p| format!("{:#x}", self.layout.page_to_gpa(p).unwrap_or(u64::MAX)))
            .collect();
        tracing::warn!(
            when,
            pages = missed.len(),
            gpas = ?first,
            "verify: pages written without being reported dirty"
        );
        if mode == VerifyMode::Repair {
            match at {
                Moment::Checkpoint(undo) => self.flush(&missed, undo)?,
                Moment::Rollback => self.drop_pages(&missed)?,
            }
        }
        Ok(())
    }
}

/// Contiguous runs of a sorted page list.
pub fn runs(pages: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(r) if r.end == p => r.end += 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests;
