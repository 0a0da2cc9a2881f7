//! Moving pages: reading the dirty logs, flushing into the memory file,
//! copying back from it, and the full-copy peer's whole-memory copies.
//! Every page number here is a page of the memory file; the tracker's
//! [`RamLayout`](crate::vstate::memory::RamLayout) says where it is mapped.

use std::collections::hash_map::Entry;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::vstate::dirty_bitmap::DirtyBitmap;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use super::copier::Segment;
use super::{CowError, MemoryTracker, UndoLog, PAGE};
use crate::vstate::memory::PAGE_SIZE;

impl MemoryTracker {
    /// The file's page `p`, through the shared view.
    fn file_page(&self, p: u64) -> *mut u8 {
        debug_assert!((p + 1) * PAGE <= self.view.size() as u64);
        // SAFETY: every page number the tracker handles comes from a range
        // of the layout, and the view maps the whole file.
        unsafe { self.view.as_ptr().add((p * PAGE) as usize) }
    }

    /// The pages written since the last call, by the guest (KVM's record,
    /// which this also clears, see [`crate::vstate::dirty`]) or by the VMM
    /// (its own bitmap, also cleared), and those a snapshot harvested
    /// without flushing. Sorted, each once. Newly reported ones are noted
    /// for the next snapshot. Costs in proportion to the pages written (and,
    /// with KVM's bitmap methods, to one bit per page of memory).
    pub(super) fn take_dirty(&mut self, vm: &VmFd) -> Result<Vec<u64>, CowError> {
        let t = std::time::Instant::now();
        let mut pages = Vec::new();
        self.kvm_log.harvest(vm, &self.layout, |p| pages.push(p))?;
        for (r, gr) in self.layout.ranges().iter().zip(self.mem.iter()) {
            let vmm: &DirtyBitmap = vm_memory::MmapRegion::bitmap(gr);
            let first = r.pages().start;
            vmm.take(|p| pages.push(first + p));
        }
        pages.sort_unstable();
        pages.dedup();
        self.since_snapshot.note(&pages);
        // A snapshot's harvest that was never flushed: those pages are
        // still newer than the file (and already noted for snapshots).
        if !self.unflushed.is_empty() {
            pages.append(&mut self.unflushed);
            pages.sort_unstable();
            pages.dedup();
        }
        self.harvested_in = Some(t.elapsed());
        Ok(pages)
    }

    /// Contiguous runs of the sorted `pages`, split where a range ends,
    /// each with the host address of its first page.
    fn host_runs(&self, pages: &[u64]) -> Vec<(Range<u64>, *mut u8)> {
        let ranges = self.layout.ranges();
        self.layout
            .page_runs(pages)
            .into_iter()
            .map(|(i, run)| {
                let off = run.start * PAGE - ranges[i].file_offset;
                // SAFETY: the run lies inside range `i`, so the address
                // stays inside that range's mapping.
                let host = unsafe { self.hosts[i].add(off as usize) };
                (run, host)
            })
            .collect()
    }

    /// Writes the dirty `pages` into the file. With `undo`, the file's old
    /// content of each page is saved there first, unless the log already
    /// has that page.
    ///
    /// The private copies stay: each now equals the file, and the guest's
    /// next writes go to it and leave the file, the checkpoint, untouched.
    /// The dirty log finds those writes; a rollback copies the file back
    /// over them, and over every page whose file content it changes.
    pub(super) fn flush(&self, pages: &[u64], undo: Option<&mut UndoLog>) -> Result<(), CowError> {
        let runs = self.host_runs(pages);
        // Every old content is saved before any page of the file changes.
        if let Some(u) = undo {
            for p in runs.iter().flat_map(|(run, _)| run.clone()) {
                if let Entry::Vacant(slot) = u.pages.entry(p) {
                    // SAFETY: the view's page is mapped and, with the
                    // vCPUs paused, written by no one meanwhile.
                    let old = unsafe { std::slice::from_raw_parts(self.file_page(p), PAGE_SIZE) };
                    slot.insert(old.into());
                }
            }
        }
        let segments: Vec<Segment> = runs
            .into_iter()
            .map(|(run, host)| Segment {
                src: host,
                dst: self.file_page(run.start),
                len: ((run.end - run.start) * PAGE) as usize,
            })
            .collect();
        // SAFETY: each run lies inside one range's mapping and inside the
        // view; the runs are disjoint; the vCPUs are paused, so no one
        // writes these pages meanwhile; and the view and the guest's
        // private mapping never overlap.
        unsafe { self.copier.copy(&segments) };
        Ok(())
    }

    /// Rolls memory back: writes the `undo` logs into the file in order
    /// (newest first, so the oldest copy of each page lands last), then
    /// copies the file's content of `dirty` (the pages written since the
    /// last flush) and of every page an undo log rewrote over the guest's
    /// private copies, so the mapping reads as the file again.
    ///
    /// Copying back rather than dropping the private copies with
    /// `MADV_DONTNEED`: the two cost about the same in the rollback itself
    /// (2,000 dirty pages at 1 GiB: ~0.65 ms of `madvise`, 0.55-0.65 ms of
    /// copying), but after a drop the guest's next write to each page
    /// faults and gets a fresh copy-on-write page. Measured as whole runs of
    /// `spec_bench` (1 GiB, 2,000 pages, 100 repetitions of speculate,
    /// abort, speculate, commit): 2.24-2.31 s with `madvise`, 1.72-1.77 s
    /// with the copy, three alternating runs each.
    /// KVM keeps mapping the same host pages, so on hosts with nested
    /// paging nothing else is needed; where KVM shadows the guest's page
    /// tables, the controller drops the shadow pages after every rollback
    /// anyway (`host_compat::shadow`), since restored page-table pages
    /// would otherwise be translated through the shadows of their newer
    /// content.
    pub(super) fn copy_back<'a>(
        &self,
        undo: impl IntoIterator<Item = &'a UndoLog>,
        dirty: &[u64],
    ) -> Result<(), CowError> {
        let mut pages: Vec<u64> = dirty.to_vec();
        for log in undo {
            for (&p, data) in &log.pages {
                // SAFETY: the view's page is mapped; `data` is one page.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), self.file_page(p), PAGE_SIZE)
                };
                pages.push(p);
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let segments: Vec<Segment> = self
            .host_runs(&pages)
            .into_iter()
            .map(|(run, host)| Segment {
                src: self.file_page(run.start),
                dst: host,
                len: ((run.end - run.start) * PAGE) as usize,
            })
            .collect();
        // SAFETY: each run lies inside one range's mapping and inside the
        // view; the runs are disjoint; the vCPUs are paused; the two
        // mappings never overlap. A page of a run without a private copy
        // gets one here (a write to a private mapping), holding the file's
        // content: the same bytes the mapping read before.
        unsafe { self.copier.copy(&segments) };
        Ok(())
    }

    /// The pages whose private copy differs from the file: writes that
    /// dirty tracking did not report. Right after a flush or a rollback
    /// there must be none (see [`crate::spec::verify`]).
    pub(super) fn unreported_pages(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for (r, &host) in self.layout.ranges().iter().zip(&self.hosts) {
            let base = r.pages().start;
            // SAFETY: the range's mapping is live (held by `mem`), the view
            // maps the whole file, and the caller has paused the vCPUs.
            let pages = unsafe {
                crate::spec::verify::differing_private_pages(host, r.size, |i| {
                    self.file_page(base + i).cast_const()
                })
            }?;
            out.extend(pages.into_iter().map(|p| base + p));
        }
        Ok(out)
    }

    /// Drops the private copies of `pages`, so the mapping reads the file.
    pub(super) fn drop_pages(&self, pages: &[u64]) -> Result<(), CowError> {
        for (run, host) in self.host_runs(pages) {
            let len = (run.end - run.start) * PAGE;
            drop_private(host, len).map_err(|e| CowError::Madvise(run.start * PAGE, e))?;
        }
        Ok(())
    }
}

/// The full-copy strategy, the naive peer of the benchmarks.
impl MemoryTracker {
    /// A copy of all of guest memory, in memory-file order.
    pub(super) fn copy_all(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.layout.mem_size() as usize);
        for (r, &host) in self.layout.ranges().iter().zip(&self.hosts) {
            // SAFETY: the range's mapping is live (held by `mem`) and the
            // vCPUs are paused.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(host, r.size as usize) });
        }
        out
    }

    /// Restores a [`MemoryTracker::copy_all`] copy: writes it into the
    /// memory file and drops every private page, so the mapping reads it.
    /// (Copying straight into the mapping is not enough on a shadow-paging
    /// KVM, whose cached translations do not see host writes to pages it
    /// already maps.)
    pub(super) fn restore_all(&self, copy: &[u8]) -> Result<(), CowError> {
        self.file
            .write_all_at(copy, 0)
            .map_err(|e| CowError::File(0, e))?;
        for (r, &host) in self.layout.ranges().iter().zip(&self.hosts) {
            drop_private(host, r.size).map_err(|e| CowError::Madvise(r.file_offset, e))?;
        }
        Ok(())
    }
}

/// Drops the private copies of `len` bytes at `host`, so the mapping reads
/// the file again.
fn drop_private(host: *mut u8, len: u64) -> io::Result<()> {
    // SAFETY: the range is page-aligned and lies inside a guest memory
    // mapping that stays mapped; MADV_DONTNEED on a private file mapping
    // only discards the copies, it does not unmap.
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
