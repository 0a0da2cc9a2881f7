//! KVM's record of the guest pages written: which method a VM uses, and
//! harvesting it so that the cost follows the pages written, not the size
//! of guest memory.
//!
//! Three methods, chosen once per VM with `KVM_CHECK_EXTENSION` before any
//! vCPU exists ([`DirtyMethod::choose`]), and named in the log:
//! - **Ring** (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`): KVM appends each page a
//!   vCPU writes to that vCPU's ring, a shared mapping of its fd. A harvest
//!   reads the entries published since the last one and hands them back
//!   (`KVM_RESET_DIRTY_RINGS` write-protects those pages again): no bitmap
//!   is read at all. A ring that fills while the guest runs stops its vCPU
//!   (`KVM_EXIT_DIRTY_RING_FULL`); the vCPU thread then moves the entries
//!   into an overflow bitmap ([`DirtyRings::drain_full`]) and runs on.
//! - **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`):
//!   `KVM_GET_DIRTY_LOG` copies the slot's bitmap without touching it, and
//!   `KVM_CLEAR_DIRTY_LOG` clears and write-protects only the words that
//!   had pages set. The copy and the scan still follow memory size (one bit
//!   per page: 128 KiB at 4 GiB), the protection work does not.
//! - **Bitmap** (the fallback every KVM has): `KVM_GET_DIRTY_LOG` copies
//!   and clears the whole bitmap and write-protects every page it found.
//!
//! `SPECVM_DIRTY_TRACKING=ring|manual-protect|bitmap` picks one by hand
//! (benchmarks compare them; a host whose ring misses writes can be put
//! back on the bitmap); one the host lacks falls back down that order.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log, kvm_enable_cap, KVMIO,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::memory::{RamLayout, PAGE_SIZE};

use crate::sync::lock;

// kvm-ioctls 0.25 wraps none of the last two; its KVM_GET_DIRTY_LOG
// allocates a new bitmap per call, where a harvest reuses one per slot
// (numbers from include/uapi/linux/kvm.h).
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `kvm_dirty_gfn.flags`: KVM published the entry (uapi `KVM_DIRTY_GFN_F_DIRTY`).
const GFN_DIRTY: u32 = 1 << 0;
/// `kvm_dirty_gfn.flags`: the VMM harvested it (uapi `KVM_DIRTY_GFN_F_RESET`).
const GFN_RESET: u32 = 1 << 1;
/// The exit reason of a full ring (`KVM_EXIT_DIRTY_RING_FULL`).
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
/// Ring size asked for, per vCPU, if the host allows it: 65,536 entries.
const RING_BYTES: u32 = 1 << 20;
/// Words of zeros between two runs of dirty words that still go into one
/// `KVM_CLEAR_DIRTY_LOG` (an ioctl costs more than clearing zero words).
const CLEAR_GAP_WORDS: usize = 8;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A dirty-log ioctl failed.
    #[error("{0} on memory slot {1}: {2}")]
    Slot(&'static str, u32, io::Error),
    /// A VM-wide dirty-log ioctl failed.
    #[error("{0}: {1}")]
    Vm(&'static str, io::Error),
}

/// How a VM's dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMethod {
    /// Per-vCPU rings of `bytes` bytes each.
    Ring {
        /// Size of each vCPU's ring in bytes.
        bytes: u32,
    },
    /// Bitmap read without clearing, cleared word by word.
    ManualProtect,
    /// Bitmap read and cleared whole.
    Bitmap,
}

impl DirtyMethod {
    /// The name used in logs and in `SPECVM_DIRTY_TRACKING`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ring { .. } => "ring",
            Self::ManualProtect => "manual-protect",
            Self::Bitmap => "bitmap",
        }
    }

    /// Picks the method for a new VM from what `vm`'s KVM offers and
    /// `wanted` (`SPECVM_DIRTY_TRACKING`), and enables it. Must run before
    /// any vCPU is created (the ring's rule). Logs the choice.
    pub fn choose(vm: &VmFd, wanted: Option<&str>) -> Self {
        let ring_max = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|c| (c, vm.check_extension_raw(c.into())))
            .find(|&(_, max)| max > 0);
        let manual = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let order: &[&str] = match wanted {
            Some("bitmap") => &["bitmap"],
            Some("manual-protect") => &["manual-protect", "bitmap"],
            Some("ring") | None => &["ring", "manual-protect", "bitmap"],
            Some(other) => {
                tracing::warn!(
                    value = other,
                    "SPECVM_DIRTY_TRACKING is not ring, manual-protect or bitmap: ignored"
                );
                &["ring", "manual-protect", "bitmap"]
            }
        };
        for &m in order {
            let chosen = match m {
                "ring" => ring_max.and_then(|(cap, max)| {
                    let bytes = ring_bytes(max as u32)?;
                    enable_cap(vm, cap, u64::from(bytes))
                        .map_err(|e| tracing::warn!("dirty tracking: enabling the ring: {e}"))
                        .ok()
                        .map(|()| Self::Ring { bytes })
                }),
                "manual-protect" if manual > 0 => enable_cap(
                    vm,
                    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into(),
                )
                .map_err(|e| tracing::warn!("dirty tracking: enabling manual protect: {e}"))
                .ok()
                .map(|()| Self::ManualProtect),
                "bitmap" => Some(Self::Bitmap),
                _ => None,
            };
            if let Some(c) = chosen {
                tracing::info!(
                    method = c.name(),
                    ring_max = ring_max.map_or(0, |(_, m)| m),
                    manual_protect = manual,
                    "dirty tracking: {}",
                    c.name()
                );
                return c;
            }
        }
        Self::Bitmap
    }
}

/// The ring size to ask for, given the host's largest: a power of two of
/// whole pages, at most [`RING_BYTES`]; `None` if the host allows less than
/// a page.
fn ring_bytes(max: u32) -> Option<u32> {
    let b = max.min(RING_BYTES);
    let b = if b.is_power_of_two() {
        b
    } else {
        1 << (31 - b.leading_zeros())
    };
    (b as usize >= PAGE_SIZE).then_some(b)
}

fn enable_cap(vm: &VmFd, cap: u32, arg0: u64) -> Result<(), kvm_ioctls::Error> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    vm.enable_cap(&c)
}

/// Calls `f(word_index, word)` for every non-zero word of `words`, in
/// order, skipping zero blocks eight words at a time.
fn nonzero_words(words: &[u64], mut f: impl FnMut(usize, u64)) {
    for (ci, chunk) in words.chunks(8).enumerate() {
        if chunk.iter().fold(0, |a, &w| a | w) == 0 {
            continue;
        }
        for (i, &w) in chunk.iter().enumerate() {
            if w != 0 {
                f(ci * 8 + i, w);
            }
        }
    }
}

/// Calls `f(page)` for every bit set in `word` (word `wi` of a bitmap
/// whose bit 0 is page `base`), below `end`.
fn word_pages(base: u64, wi: usize, mut word: u64, end: u64, f: &mut impl FnMut(u64)) {
    while word != 0 {
        let page = base + wi as u64 * 64 + u64::from(word.trailing_zeros());
        word &= word - 1;
        if page < end {
            f(page);
        }
    }
}

/// The runs of word indexes to clear: non-zero words, runs joined across
/// gaps of at most [`CLEAR_GAP_WORDS`] zero words.
pub(crate) fn clear_runs(nonzero: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &w in nonzero {
        match out.last_mut() {
            Some(r) if w <= r.end + CLEAR_GAP_WORDS => r.end = w + 1,
            _ => out.push(w..w + 1),
        }
    }
    out
}

/// The KVM side of a VM's dirty tracking, held by the memory tracker.
pub struct KvmDirtyLog {
    method: DirtyMethod,
    /// One bitmap buffer per slot, reused (bitmap methods).
    bufs: Vec<Vec<u64>>,
    rings: Option<Arc<DirtyRings>>,
}

impl KvmDirtyLog {
    /// The log of a VM using `method`; `rings` must be given for a ring.
    pub fn new(method: DirtyMethod, rings: Option<Arc<DirtyRings>>) -> Self {
        let method = match (method, &rings) {
            (DirtyMethod::Ring { .. }, None) => DirtyMethod::Bitmap,
            (m, _) => m,
        };
        Self {
            method,
            bufs: Vec::new(),
            rings,
        }
    }

    /// The method in use.
    pub fn method(&self) -> DirtyMethod {
        self.method
    }

    /// Calls `f` with the memory-file page of every guest page written
    /// since the last harvest (a page may come more than once), and makes
    /// KVM watch those pages again. Slot `i` is range `i` of `layout`. All
    /// vCPUs must be parked.
    pub fn harvest(
        &mut self,
        vm: &VmFd,
        layout: &RamLayout,
        mut f: impl FnMut(u64),
    ) -> Result<(), DirtyError> {
        match self.method {
            DirtyMethod::Ring { .. } => {
                let rings = self.rings.as_ref().expect("a ring method has rings");
                rings.harvest(layout, &mut f);
                rings.reset()
            }
            DirtyMethod::ManualProtect | DirtyMethod::Bitmap => {
                let manual = self.method == DirtyMethod::ManualProtect;
                self.bufs.resize_with(layout.ranges().len(), Vec::new);
                for (slot, (r, buf)) in layout.ranges().iter().zip(&mut self.bufs).enumerate() {
                    let slot = slot as u32;
                    let pages = r.pages();
                    let npages = pages.end - pages.start;
                    buf.resize(npages.div_ceil(64) as usize, 0);
                    get_dirty_log(vm, slot, buf)?;
                    let mut dirty_words = Vec::new();
                    nonzero_words(buf, |wi, w| {
                        dirty_words.push(wi);
                        word_pages(pages.start, wi, w, pages.end, &mut f);
                    });
                    if manual {
                        for run in clear_runs(&dirty_words) {
                            clear_dirty_log(vm, slot, npages, run, buf)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn get_dirty_log(vm: &VmFd, slot: u32, buf: &mut [u64]) -> Result<(), DirtyError> {
    let mut log = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr().cast();
    // SAFETY: `buf` holds a bit for every page of the slot (the caller
    // sized it from the slot's range), and KVM writes no more than that.
    let r = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if r < 0 {
        return Err(DirtyError::Slot(
            "KVM_GET_DIRTY_LOG",
            slot,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Clears (and write-protects again) the pages of `buf`'s words `run` in
/// `slot`, a slot of `npages` pages.
fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    npages: u64,
    run: std::ops::Range<usize>,
    buf: &mut [u64],
) -> Result<(), DirtyError> {
    let first = run.start as u64 * 64;
    // A multiple of 64 pages, unless the run reaches the slot's end.
    let num = (run.len() as u64 * 64).min(npages - first);
    let mut log = kvm_clear_dirty_log {
        slot,
        num_pages: num as u32,
        first_page: first,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = buf[run].as_mut_ptr().cast();
    // SAFETY: the bitmap covers `num` pages from `first`, inside the slot;
    // KVM only reads it.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if r < 0 {
        return Err(DirtyError::Slot(
            "KVM_CLEAR_DIRTY_LOG",
            slot,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// One ring's entries: a mapping of a vCPU's fd, or (in tests) memory.
struct RingMem {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// Whether `base` is an mmap of `entries` entries to unmap on drop.
    mapped: bool,
}

// SAFETY: the entries are only touched through atomics on `flags` and
// plain reads of the rest after an acquire of `flags` (KVM's protocol);
// each ring's cursor is behind a mutex.
unsafe impl Send for RingMem {}
// SAFETY: as for Send: shared access goes through `flags` atomics, and
// every harvest of a ring holds that ring's cursor mutex.
unsafe impl Sync for RingMem {}

impl Drop for RingMem {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `base` is the start of a mapping of exactly this
            // size, made in `DirtyRings::map`, and nothing uses it now.
            unsafe {
                libc::munmap(
                    self.base.cast(),
                    self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
                )
            };
        }
    }
}

impl RingMem {
    /// Reads the entries KVM published from `*cursor` on: calls `f(slot,
    /// offset)` for each, marks it harvested, and moves the cursor. At most
    /// one lap of the ring. Returns how many entries were taken.
    fn harvest(&self, cursor: &mut u32, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        while n < self.entries {
            let i = (*cursor % self.entries) as usize;
            // SAFETY: `i` is below `entries`, so the entry is inside the
            // ring; `flags` is a naturally aligned u32 shared with KVM,
            // accessed atomically as KVM's protocol asks.
            let e = unsafe { self.base.add(i) };
            // SAFETY: as above; KVM only ever accesses `flags` atomically too.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: KVM wrote slot and offset before publishing the flag
            // (release), which the acquire above ordered before these reads.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            *cursor = cursor.wrapping_add(1);
            n += 1;
        }
        n
    }
}

/// Pages moved out of full rings while the guest ran, until the next
/// harvest: a bitmap per slot, made on the first overflow. It costs a scan
/// of memory's bitmap, but only after a ring filled, that is after at
/// least a ring's worth of pages (65,536) was written.
#[derive(Default)]
struct Overflow {
    slots: Vec<Vec<u64>>,
    any: bool,
}

/// Every vCPU's dirty ring of one VM.
pub struct DirtyRings {
    rings: Vec<(RingMem, Mutex<u32>)>,
    overflow: Mutex<Overflow>,
    /// Pages per slot, for the overflow bitmaps and to check entries.
    slot_pages: Vec<u64>,
    /// The VM's fd (a duplicate), for `KVM_RESET_DIRTY_RINGS` from the
    /// vCPU threads.
    vm: File,
}

impl DirtyRings {
    /// Maps the ring of each of `vcpus` (`bytes` each, the size enabled on
    /// `vm`), for a VM whose slots are the ranges of `layout`.
    pub fn map(vm: &VmFd, vcpus: &[&VcpuFd], bytes: u32, layout: &RamLayout) -> io::Result<Self> {
        let entries = bytes as usize / std::mem::size_of::<kvm_dirty_gfn>();
        let mut rings = Vec::new();
        for fd in vcpus {
            // SAFETY: a fresh shared mapping of the vCPU's ring, at the
            // offset and size KVM documents; checked for failure.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    (KVM_DIRTY_LOG_PAGE_OFFSET as usize * PAGE_SIZE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            rings.push((
                RingMem {
                    base: p.cast(),
                    entries: entries as u32,
                    mapped: true,
                },
                Mutex::new(0),
            ));
        }
        // SAFETY: dup returns a new descriptor we own, checked below.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            rings,
            overflow: Mutex::default(),
            slot_pages: layout
                .ranges()
                .iter()
                .map(|r| r.size / PAGE_SIZE as u64)
                .collect(),
            // SAFETY: `dup` is a descriptor this process just made.
            vm: unsafe { File::from_raw_fd(dup) },
        })
    }

    /// Calls `f` with the memory-file page of every entry published in any
    /// ring since the last harvest, and of every page an overflow moved
    /// aside. Entries naming no RAM slot are skipped (with a warning).
    fn harvest(&self, layout: &RamLayout, f: &mut impl FnMut(u64)) {
        let ranges = layout.ranges();
        for (ring, cursor) in &self.rings {
            let mut cursor = lock(cursor);
            ring.harvest(&mut cursor, |slot, offset| {
                match gfn_page(ranges, slot, offset) {
                    Some(p) => f(p),
                    None => tracing::warn!(slot, offset, "dirty ring: an entry outside guest RAM"),
                }
            });
        }
        let mut o = lock(&self.overflow);
        if std::mem::take(&mut o.any) {
            for (r, bits) in ranges.iter().zip(&mut o.slots) {
                let pages = r.pages();
                nonzero_words(bits, |wi, w| word_pages(pages.start, wi, w, pages.end, f));
                bits.iter_mut().for_each(|w| *w = 0);
            }
        }
    }

    /// Makes KVM write-protect the harvested pages again, so their next
    /// write is recorded.
    fn reset(&self) -> Result<(), DirtyError> {
        // SAFETY: a VM ioctl without arguments on our VM's fd.
        let r = unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
        if r < 0 {
            return Err(DirtyError::Vm(
                "KVM_RESET_DIRTY_RINGS",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// On vCPU `index`'s `KVM_EXIT_DIRTY_RING_FULL`, from its own thread:
    /// moves its ring's entries into the overflow bitmaps and resets the
    /// rings, so the vCPU can run on.
    pub fn drain_full(&self, index: usize) -> Result<(), DirtyError> {
        let moved = self.move_to_overflow(index);
        tracing::debug!(
            vcpu = index,
            moved,
            "dirty ring full: moved to the overflow"
        );
        self.reset()
    }

    /// Moves vCPU `index`'s published entries into the overflow bitmaps;
    /// returns how many.
    fn move_to_overflow(&self, index: usize) -> u32 {
        let Some((ring, cursor)) = self.rings.get(index) else {
            return 0;
        };
        let mut o = lock(&self.overflow);
        if o.slots.is_empty() {
            o.slots = self
                .slot_pages
                .iter()
                .map(|&n| vec![0u64; n.div_ceil(64) as usize])
                .collect();
        }
        let mut cursor = lock(cursor);
        let slots = &mut o.slots;
        let taken = ring.harvest(&mut cursor, |slot, offset| {
            if let Some(bits) = slots.get_mut(slot as usize) {
                if let Some(w) = bits.get_mut((offset / 64) as usize) {
                    *w |= 1 << (offset % 64);
                }
            }
        });
        o.any |= taken > 0;
        taken
    }
}

/// The memory-file page of a ring entry, if it names a page of a RAM slot
/// (address space 0, slot below the number of ranges).
fn gfn_page(ranges: &[crate::vstate::memory::RamRange], slot: u32, offset: u64) -> Option<u64> {
    let r = ranges.get(usize::try_from(slot).ok()?)?;
    let pages = r.pages();
    let p = pages.start.checked_add(offset)?;
    (p < pages.end).then_some(p)
}

#[cfg(test)]
mod tests;
