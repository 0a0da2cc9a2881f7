//! The VMM's own log of the guest pages it writes (device DMA, loaders),
//! as vm-memory's bitmap of each region.
//!
//! vm-memory's `AtomicBitmap` can only be read back whole
//! (`get_and_reset` swaps every word: 16,384 atomic swaps and a 128 KiB
//! allocation for 4 GiB, at every checkpoint and rollback). This bitmap keeps a summary beside
//! the page bits, one bit per group of 64 words (4,096 pages, 16 MiB), so
//! [`DirtyBitmap::take`] visits only the groups written since the last
//! call: its cost follows the pages written, not the size of memory.
//! Written by hand because vm-memory offers no bitmap with a summary; it
//! plugs into vm-memory through its `Bitmap` traits like `AtomicBitmap`.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::memory::PAGE_SIZE;

/// Words of page bits per summary bit.
const GROUP_WORDS: usize = 64;

/// One bit per page, and one summary bit per [`GROUP_WORDS`] words.
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
    pages: usize,
}

impl DirtyBitmap {
    /// A clean bitmap for `bytes` bytes of memory.
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64);
        let groups = words.div_ceil(GROUP_WORDS);
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..groups.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
        }
    }

    /// Marks page `page` written. Pages past the end are ignored.
    pub fn set_page(&self, page: usize) {
        if page >= self.pages {
            return;
        }
        let word = page / 64;
        // The page bit first, then the summary bit: a `take` that clears
        // the summary before it is set here finds the page next time.
        self.words[word].fetch_or(1 << (page % 64), Ordering::Release);
        let group = word / GROUP_WORDS;
        self.summary[group / 64].fetch_or(1 << (group % 64), Ordering::Release);
    }

    /// Whether page `page` is marked.
    pub fn page_is_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Calls `f` with every page marked since the last call, in order, and
    /// clears them. Visits only the groups whose summary bit is set.
    pub fn take(&self, mut f: impl FnMut(u64)) {
        for (si, s) in self.summary.iter().enumerate() {
            if s.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut groups = s.swap(0, Ordering::AcqRel);
            while groups != 0 {
                let group = si * 64 + groups.trailing_zeros() as usize;
                groups &= groups - 1;
                let first = group * GROUP_WORDS;
                let end = (first + GROUP_WORDS).min(self.words.len());
                for (wi, w) in self.words[first..end].iter().enumerate() {
                    if w.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    let mut bits = w.swap(0, Ordering::AcqRel);
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        f((first + wi) as u64 * 64 + b);
                    }
                }
            }
        }
    }

    /// Clears every bit.
    pub fn reset(&self) {
        self.take(|_| ());
    }
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        let copy = |v: &[AtomicU64]| {
            v.iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect()
        };
        Self {
            words: copy(&self.words),
            summary: copy(&self.summary),
            pages: self.pages,
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        (first..=last.min(self.pages.saturating_sub(1))).for_each(|p| self.set_page(p));
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.page_is_set(offset / PAGE_SIZE)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        Self::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(b: &DirtyBitmap) -> Vec<u64> {
        let mut v = Vec::new();
        b.take(|p| v.push(p));
        v
    }

    #[test]
    fn take_returns_each_marked_page_once_in_order_and_clears() {
        // 1 GiB: 262,144 pages, 4,096 words, 64 groups.
        let b = DirtyBitmap::new(1 << 30);
        let pages = [0u64, 1, 63, 64, 4095, 4096, 200_000, 262_143];
        for &p in pages.iter().rev() {
            b.set_page(p as usize);
        }
        b.set_page(64); // twice: still once
        b.set_page(262_144); // past the end: ignored
        assert!(b.page_is_set(4096) && !b.page_is_set(4097));
        assert_eq!(taken(&b), pages);
        assert!(taken(&b).is_empty(), "take clears");
        assert!(!b.page_is_set(4096));
    }

    #[test]
    fn mark_dirty_covers_every_page_a_byte_range_touches() {
        let b = DirtyBitmap::new(64 * PAGE_SIZE);
        b.mark_dirty(PAGE_SIZE - 1, 2); // straddles pages 0 and 1
        b.mark_dirty(10 * PAGE_SIZE, 0); // nothing
        b.mark_dirty(63 * PAGE_SIZE, 5 * PAGE_SIZE); // clipped at the end
        assert!(b.dirty_at(0) && b.dirty_at(PAGE_SIZE) && !b.dirty_at(2 * PAGE_SIZE));
        assert_eq!(taken(&b), vec![0, 1, 63]);
    }

    #[test]
    fn a_clone_is_a_copy_and_vm_memory_marks_it_through_slices() {
        let b = DirtyBitmap::new(16 * PAGE_SIZE);
        b.slice_at(3 * PAGE_SIZE).mark_dirty(PAGE_SIZE, 1); // page 4
        let c = b.clone();
        b.reset();
        assert_eq!(taken(&c), vec![4]);
        assert!(taken(&b).is_empty());
    }
}
