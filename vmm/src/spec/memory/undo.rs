//! What a checkpoint keeps of memory: an undo log (copy-on-write) or a
//! copy of all of it (full copy), and how a commit folds one into the
//! checkpoint below.

use std::collections::HashMap;

use crate::spec::stack::Fold;

/// The pre-images of pages overwritten in the memory file since a
/// checkpoint, keyed by page number in the file.
#[derive(Default)]
pub struct UndoLog {
    pub(super) pages: HashMap<u64, Box<[u8]>>,
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

/// The memory part of a checkpoint, made by
/// [`super::MemoryTracker::checkpoint`] in its tracker's strategy.
pub struct MemoryCheckpoint(Saved);

enum Saved {
    /// Copy-on-write: the pre-images of pages flushed since.
    Undo(UndoLog),
    /// Full copy: all of guest memory, in memory-file order.
    Copy(Vec<u8>),
}

impl MemoryCheckpoint {
    pub(super) fn empty_undo() -> Self {
        Self(Saved::Undo(UndoLog::default()))
    }

    pub(super) fn full(copy: Vec<u8>) -> Self {
        Self(Saved::Copy(copy))
    }

    pub(super) fn undo(&self) -> Option<&UndoLog> {
        match &self.0 {
            Saved::Undo(u) => Some(u),
            Saved::Copy(_) => None,
        }
    }

    pub(super) fn undo_mut(&mut self) -> Option<&mut UndoLog> {
        match &mut self.0 {
            Saved::Undo(u) => Some(u),
            Saved::Copy(_) => None,
        }
    }

    pub(super) fn copy(&self) -> Option<&[u8]> {
        match &self.0 {
            Saved::Copy(c) => Some(c),
            Saved::Undo(_) => None,
        }
    }

    /// Pages held for undo (0 for a full copy).
    pub fn undo_pages(&self) -> usize {
        self.undo().map_or(0, UndoLog::len)
    }

    /// Host memory this checkpoint holds: its undo pages, or its copy.
    pub fn held_bytes(&self) -> u64 {
        match &self.0 {
            Saved::Undo(u) => u.len() as u64 * crate::vstate::memory::PAGE_SIZE as u64,
            Saved::Copy(c) => c.len() as u64,
        }
    }
}

impl Fold for MemoryCheckpoint {
    fn fold_into(self, older: &mut Self) {
        // A full copy restores on its own: the older one needs nothing of
        // the newer. (One tracker never mixes the two.)
        if let (Saved::Undo(newer), Saved::Undo(older)) = (self.0, &mut older.0) {
            newer.fold_into(older);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_memory_checkpoint_folds_its_log_and_a_full_copy_stays() {
        let mut older = MemoryCheckpoint::empty_undo();
        let mut newer = MemoryCheckpoint::empty_undo();
        let log = newer.undo_mut().unwrap();
        log.pages.insert(7, vec![7u8; 4].into_boxed_slice());
        newer.fold_into(&mut older);
        assert_eq!(older.undo_pages(), 1);

        let mut older = MemoryCheckpoint::full(vec![1, 2, 3]);
        MemoryCheckpoint::full(vec![4, 5, 6]).fold_into(&mut older);
        assert_eq!(older.copy(), Some(&[1u8, 2, 3][..]));
        assert_eq!(older.undo_pages(), 0);
    }
}
