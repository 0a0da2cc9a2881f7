//! Copy-on-write memory checkpoints.
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
//!   are written back into the file (the oldest copy of a page wins), and
//!   every page dirty since the last flush, or rewritten from a log, loses
//!   its private copy (`MADV_DONTNEED`): the mapping then reads the file,
//!   which now holds the state at k.
//! - **Commit** folds an undo log into the one below (see
//!   [`crate::spec::stack::Fold`]).
//!
//! Every step costs in proportion to the pages that changed, never to the
//! size of guest memory, apart from reading the dirty bitmaps (one bit per
//! page: 32 KiB for 1 GiB).
//!
//! Why this and not userfaultfd write-protection: HOST-KVM.md measured a
//! guest's first write per page at ~5.5 µs here against ~60 µs with
//! userfaultfd, and a revert at ~2.5 µs per page; write-protecting the
//! whole range at each checkpoint also grows with populated memory. The
//! price of this design is the flush at `speculate`, which copies the
//! pages dirtied since the previous flush (see `docs/speculation.md` for
//! the measurements).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::spec::stack::Fold;
use crate::vstate::memory::{GuestMemoryMmap, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Errors of memory checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// KVM_GET_DIRTY_LOG failed.
    #[error("reading the dirty log of memory slot {0}: {1}")]
    DirtyLog(u32, kvm_ioctls::Error),
    /// Reading or writing the memory file failed.
    #[error("guest memory file at offset {0:#x}: {1}")]
    File(u64, io::Error),
    /// madvise failed.
    #[error("dropping guest pages at offset {0:#x}: {1}")]
    Madvise(u64, io::Error),
}

/// The pre-images of pages overwritten in the memory file since a
/// checkpoint, keyed by page number in the file.
#[derive(Default)]
pub struct UndoLog {
    pages: HashMap<u64, Box<[u8]>>,
}

impl UndoLog {
    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl Fold for UndoLog {
    fn fold_into(self, older: &mut Self) {
        // The older log's copy of a page is older still: it wins.
        for (page, data) in self.pages {
            older.pages.entry(page).or_insert(data);
        }
    }
}

/// One memory region as the tracker sees it.
struct Region {
    slot: u32,
    gpa: u64,
    host: *mut u8,
    size: u64,
    file_offset: u64,
}

/// Finds dirty pages and moves memory between checkpoints.
pub struct MemoryTracker {
    file: File,
    /// The whole file, mapped shared: copying a page through it costs a
    /// memcpy, where `pwrite`/`pread` cost a system call per run or page.
    view: vm_memory::MmapRegion,
    regions: Vec<Region>,
    mem: GuestMemoryMmap,
}

// SAFETY: the raw host pointers point into mappings owned by `mem`, which
// the tracker holds (and so keeps mapped); all access goes through methods
// that the VMM calls only while every vCPU is paused.
unsafe impl Send for MemoryTracker {}

impl MemoryTracker {
    /// A tracker over `mem`, whose regions map `file` at increasing offsets
    /// and are KVM memory slots 0, 1, ... in order.
    pub fn new(mem: &GuestMemoryMmap, file: &File) -> io::Result<Self> {
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (slot, r) in mem.iter().enumerate() {
            regions.push(Region {
                slot: slot as u32,
                gpa: r.start_addr().0,
                host: r.as_ptr(),
                size: r.len(),
                file_offset,
            });
            file_offset += r.len();
        }
        let view = vm_memory::mmap::MmapRegionBuilder::new(file_offset as usize)
            .with_file_offset(vm_memory::FileOffset::new(file.try_clone()?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(io::Error::other)?;
        Ok(Self {
            file: file.try_clone()?,
            view,
            regions,
            mem: mem.clone(),
        })
    }

    /// The file's page `p`, through the shared view.
    fn file_page(&self, p: u64) -> *mut u8 {
        debug_assert!((p + 1) * PAGE <= self.view.size() as u64);
        // SAFETY: every page number the tracker handles comes from a region
        // of the file, which the view maps whole.
        unsafe { self.view.as_ptr().add((p * PAGE) as usize) }
    }

    /// The pages (numbered in the file) written since the last call, by the
    /// guest (KVM's dirty log, which this also clears) or by the VMM
    /// (vm-memory's bitmap, also cleared). Sorted.
    pub fn take_dirty(&self, vm: &VmFd) -> Result<Vec<u64>, CowError> {
        let mut pages = Vec::new();
        for (r, gr) in self.regions.iter().zip(self.mem.iter()) {
            let kvm = vm
                .get_dirty_log(r.slot, r.size as usize)
                .map_err(|e| CowError::DirtyLog(r.slot, e))?;
            let vmm: &AtomicBitmap = vm_memory::MmapRegion::bitmap(gr);
            let vmm = vmm.get_and_reset();
            let base = r.file_offset / PAGE;
            for (i, word) in kvm.iter().enumerate() {
                let mut bits = word | vmm.get(i).copied().unwrap_or(0);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = i as u64 * 64 + b;
                    if page < r.size / PAGE {
                        pages.push(base + page);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Contiguous runs of the sorted `pages`, split where a region ends, each
    /// with the host address of its first page.
    fn host_runs(&self, pages: &[u64]) -> Vec<(std::ops::Range<u64>, *mut u8)> {
        let mut out = Vec::new();
        for run in runs(pages) {
            let mut p = run.start;
            while p < run.end {
                let off = p * PAGE;
                let Some(r) = self
                    .regions
                    .iter()
                    .find(|r| (r.file_offset..r.file_offset + r.size).contains(&off))
                else {
                    break;
                };
                let end = run.end.min((r.file_offset + r.size) / PAGE);
                // SAFETY: `off` lies inside this region, so the address
                // stays inside its mapping.
                let host = unsafe { r.host.add((off - r.file_offset) as usize) };
                out.push((p..end, host));
                p = end;
            }
        }
        out
    }

    /// Writes the dirty `pages` into the file. With `undo`, the file's old
    /// content of each page is saved there first, unless the log already
    /// has that page.
    ///
    /// The private copies stay: each now equals the file, and the guest's
    /// next writes go to it and leave the file, the checkpoint, untouched.
    /// The dirty log finds those writes; a rollback drops those pages, and
    /// every page whose file content it changes.
    pub fn flush(&self, pages: &[u64], mut undo: Option<&mut UndoLog>) -> Result<(), CowError> {
        for (run, host) in self.host_runs(pages) {
            if let Some(u) = undo.as_deref_mut() {
                for p in run.clone() {
                    if let std::collections::hash_map::Entry::Vacant(slot) = u.pages.entry(p) {
                        // SAFETY: the view's page is mapped and, with the
                        // vCPUs paused, written by no one meanwhile.
                        let old =
                            unsafe { std::slice::from_raw_parts(self.file_page(p), PAGE_SIZE) };
                        slot.insert(old.into());
                    }
                }
            }
            let len = (run.end - run.start) * PAGE;
            // SAFETY: the run lies inside one region's mapping and inside the
            // view; the vCPUs are paused, so no one writes these pages
            // meanwhile; and the view and the guest's private mapping never overlap.
            unsafe { std::ptr::copy_nonoverlapping(host, self.file_page(run.start), len as usize) };
        }
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
    pub fn rollback<'a>(
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
        for (run, host) in self.host_runs(&pages) {
            let len = (run.end - run.start) * PAGE;
            // SAFETY: the run lies inside one region's mapping and inside
            // the view; the vCPUs are paused; the two never overlap. A page
            // of the run without a private copy gets one here (a write to a
            // private mapping), holding the file's content: the same bytes
            // the mapping read before.
            unsafe { std::ptr::copy_nonoverlapping(self.file_page(run.start), host, len as usize) };
        }
        Ok(())
    }
}

impl MemoryTracker {
    /// The pages (numbered in the file) whose private copy differs from
    /// the file: writes that dirty tracking did not report. Right after a
    /// flush or a rollback there must be none (see [`crate::spec::verify`]).
    pub fn unreported_pages(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for r in &self.regions {
            let base = r.file_offset / PAGE;
            // SAFETY: the region's mapping is live (held by `mem`), the view
            // maps the whole file, and the caller has paused the vCPUs.
            let pages = unsafe {
                crate::spec::verify::differing_private_pages(r.host, r.size, |i| {
                    self.file_page(base + i).cast_const()
                })
            }?;
            out.extend(pages.into_iter().map(|p| base + p));
        }
        Ok(out)
    }

    /// The guest-physical address of the file's page `p`.
    pub fn file_page_to_gpa(&self, p: u64) -> u64 {
        let off = p * PAGE;
        self.regions
            .iter()
            .find(|r| (r.file_offset..r.file_offset + r.size).contains(&off))
            .map_or(u64::MAX, |r| r.gpa + off - r.file_offset)
    }

    /// Drops the private copies of `pages`, so the mapping reads the file.
    pub fn drop_pages(&self, pages: &[u64]) -> Result<(), CowError> {
        for (run, host) in self.host_runs(pages) {
            let len = (run.end - run.start) * PAGE;
            drop_private(host, len).map_err(|e| CowError::Madvise(run.start * PAGE, e))?;
        }
        Ok(())
    }
}

impl MemoryTracker {
    /// The naive checkpoint, for comparison in benchmarks: a copy of all of
    /// guest memory.
    pub fn copy_all(&self) -> Vec<u8> {
        let total: u64 = self.regions.iter().map(|r| r.size).sum();
        let mut out = Vec::with_capacity(total as usize);
        for r in &self.regions {
            // SAFETY: the region's mapping is live (held by `mem`) and the
            // vCPUs are paused.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(r.host, r.size as usize) });
        }
        out
    }

    /// Restores a [`MemoryTracker::copy_all`] copy: writes it into the
    /// memory file and drops every private page, so the mapping reads it.
    /// (Copying straight into the mapping is not enough on a shadow-paging
    /// KVM, whose cached translations do not see host writes to pages it
    /// already maps.)
    pub fn restore_all(&self, copy: &[u8]) -> Result<(), CowError> {
        self.file
            .write_all_at(copy, 0)
            .map_err(|e| CowError::File(0, e))?;
        for r in &self.regions {
            drop_private(r.host, r.size).map_err(|e| CowError::Madvise(r.file_offset, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_pages() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![1..4, 7..8, 9..11]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn the_verifier_finds_exactly_the_unreported_writes() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let t = MemoryTracker::new(&ram.mem, &ram.file).unwrap();
        // Page 5 is written as the VMM writes (reported through the bitmap),
        // page 9 behind the tracker's back, page 12 is only read.
        ram.mem
            .write_obj(0x1111u64, GuestAddress(5 * PAGE))
            .unwrap();
        let host = ram.mem.get_host_address(GuestAddress(9 * PAGE)).unwrap();
        // SAFETY: a page inside the guest mapping, which `ram` keeps alive.
        unsafe { host.cast::<u64>().write(0x2222) };
        let _: u64 = ram.mem.read_obj(GuestAddress(12 * PAGE)).unwrap();
        t.flush(&[5], None).unwrap();
        assert_eq!(t.unreported_pages().unwrap(), vec![9]);
        assert_eq!(t.file_page_to_gpa(9), 9 * PAGE);
        t.drop_pages(&[9]).unwrap();
        assert!(t.unreported_pages().unwrap().is_empty());
        let v: u64 = ram.mem.read_obj(GuestAddress(9 * PAGE)).unwrap();
        assert_eq!(v, 0, "the dropped page reads the file again");
        let v: u64 = ram.mem.read_obj(GuestAddress(5 * PAGE)).unwrap();
        assert_eq!(v, 0x1111, "the flushed page keeps its content");
    }

    #[test]
    fn fold_keeps_the_older_copy() {
        let mut older = UndoLog::default();
        older.pages.insert(1, vec![1u8; 4].into_boxed_slice());
        let mut newer = UndoLog::default();
        newer.pages.insert(1, vec![2u8; 4].into_boxed_slice());
        newer.pages.insert(2, vec![3u8; 4].into_boxed_slice());
        newer.fold_into(&mut older);
        assert_eq!(older.len(), 2);
        assert_eq!(older.pages[&1][0], 1);
        assert_eq!(older.pages[&2][0], 3);
    }
}
