//! The checkpoint stack of one VM: the rules of `SPECULATIONS.md`, free of
//! KVM, so they can be tested on their own.
//!
//! The stack holds *frames*. A frame is one checkpoint and the entries that
//! share it: one explicit entry (from `speculate()`), or one or more
//! implicit entries pushed together when a packet tagged with new ids
//! arrived (rule 2). The checkpoint type `C` is generic: the VMM's holds
//! machine state and a memory undo log; tests use a model.

/// A speculation id, unique across every VM sharing a bridge fabric: the
/// owner VM's id and a sequence number of that VM. The one type of the VMM,
/// the bridge and the wire.
pub use specwire::SpecId;

/// A checkpoint whose undo information can be folded into an older one
/// when the entries that needed it are gone (rules 5 and 6).
pub trait Fold {
    /// Folds `self`, a newer checkpoint, into `older`, the one just below
    /// it, so `older` can still restore its own state.
    fn fold_into(self, older: &mut Self);
}

/// One entry of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The speculation.
    pub id: SpecId,
    /// Started here by `speculate()` (explicit), or joined (implicit).
    pub explicit: bool,
}

struct Frame<C> {
    checkpoint: C,
    entries: Vec<Entry>,
}

/// Why a stack operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    /// `commit()` or `abort()` with no explicit entry on the stack.
    #[error("the VM holds no speculation of its own")]
    NoSpeculation,
    /// The stack is at its depth limit.
    #[error("the checkpoint stack is full ({0} frames)")]
    TooDeep(usize),
}

/// What a rollback did: the checkpoints to undo, and the ids it touched.
pub struct Rollback<C> {
    /// The popped frames' checkpoints, newest first; the last one is the
    /// state to restore.
    pub checkpoints: Vec<C>,
    /// Explicit entries that were popped: this VM's own speculations, now
    /// aborted, to broadcast (rules 3 and 4).
    pub aborted: Vec<SpecId>,
    /// Implicit entries that were popped: speculations this VM no longer
    /// depends on.
    pub left: Vec<SpecId>,
}

/// The checkpoint stack.
pub struct SpecStack<C> {
    vm: u32,
    next_seq: u32,
    max_frames: usize,
    frames: Vec<Frame<C>>,
}

impl<C: Fold> SpecStack<C> {
    /// An empty stack for VM `vm`, holding at most `max_frames` frames.
    /// Sequence numbers start at 1.
    pub fn new(vm: u32, max_frames: usize) -> Self {
        Self::with_first_seq(vm, max_frames, 1)
    }

    /// Like [`SpecStack::new`], with sequence numbers starting at `first`
    /// (0 becomes 1). A VM on a bridge starts where the bridge says, so a
    /// VM that reuses the id of one that ended does not reuse its
    /// speculation ids, whose outcomes the bridge remembers.
    pub fn with_first_seq(vm: u32, max_frames: usize, first: u32) -> Self {
        Self {
            vm,
            next_seq: first.max(1),
            max_frames,
            frames: Vec::new(),
        }
    }

    /// Every checkpoint held, oldest first.
    pub fn checkpoints(&self) -> impl Iterator<Item = &C> {
        self.frames.iter().map(|f| &f.checkpoint)
    }

    /// Number of frames (checkpoints) held.
    pub fn depth(&self) -> usize {
        self.frames.len()
    }

    /// All entries, bottom first.
    pub fn entries(&self) -> Vec<Entry> {
        self.frames
            .iter()
            .flat_map(|f| f.entries.iter().copied())
            .collect()
    }

    /// The dependency set: every id the VM's state depends on, bottom first.
    pub fn deps(&self) -> Vec<SpecId> {
        self.entries().into_iter().map(|e| e.id).collect()
    }

    /// Whether the VM depends on `id`.
    pub fn holds(&self, id: SpecId) -> bool {
        self.frames
            .iter()
            .any(|f| f.entries.iter().any(|e| e.id == id))
    }

    /// The newest checkpoint, which collects undo information for the
    /// changes being made now.
    pub fn top_mut(&mut self) -> Option<&mut C> {
        self.frames.last_mut().map(|f| &mut f.checkpoint)
    }

    /// Whether another frame may be pushed.
    pub fn can_push(&self) -> Result<(), StackError> {
        if self.frames.len() >= self.max_frames {
            Err(StackError::TooDeep(self.max_frames))
        } else {
            Ok(())
        }
    }

    /// Rule 1: pushes an explicit entry with a fresh id.
    pub fn speculate(&mut self, checkpoint: C) -> Result<SpecId, StackError> {
        self.can_push()?;
        let id = SpecId {
            vm: self.vm,
            seq: self.next_seq,
        };
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        self.frames.push(Frame {
            checkpoint,
            entries: vec![Entry { id, explicit: true }],
        });
        Ok(id)
    }

    /// The ids of `tags` that the VM does not depend on yet (rule 2).
    pub fn missing(&self, tags: &[SpecId]) -> Vec<SpecId> {
        let mut out: Vec<SpecId> = Vec::new();
        for &t in tags {
            if !self.holds(t) && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Rule 2: pushes one implicit entry for each id of `ids` (which must
    /// be [`Self::missing`] ones), all sharing `checkpoint`.
    pub fn join(&mut self, ids: &[SpecId], checkpoint: C) -> Result<(), StackError> {
        self.can_push()?;
        let entries = ids
            .iter()
            .map(|&id| Entry {
                id,
                explicit: false,
            })
            .collect();
        self.frames.push(Frame {
            checkpoint,
            entries,
        });
        Ok(())
    }

    /// The topmost explicit entry: the VM's innermost own speculation.
    pub fn top_explicit(&self) -> Option<SpecId> {
        self.frames
            .iter()
            .rev()
            .flat_map(|f| f.entries.iter().rev())
            .find(|e| e.explicit)
            .map(|e| e.id)
    }

    /// Rule 3: aborts the topmost explicit entry.
    pub fn abort_own(&mut self) -> Result<Rollback<C>, StackError> {
        let id = self.top_explicit().ok_or(StackError::NoSpeculation)?;
        Ok(self
            .rollback_to(id)
            .expect("the topmost explicit entry is on the stack"))
    }

    /// Rule 4 (and rule 3 for the owner): rolls back to the lowest frame
    /// holding `id`, popping it and everything above. `None` if the VM does
    /// not hold `id` (rule 6: stale or repeated messages change nothing).
    pub fn rollback_to(&mut self, id: SpecId) -> Option<Rollback<C>> {
        let pos = self
            .frames
            .iter()
            .position(|f| f.entries.iter().any(|e| e.id == id))?;
        let mut rb = Rollback {
            checkpoints: Vec::new(),
            aborted: Vec::new(),
            left: Vec::new(),
        };
        while self.frames.len() > pos {
            let f = self.frames.pop().expect("len > pos >= 0");
            for e in f.entries {
                if e.explicit {
                    rb.aborted.push(e.id);
                } else {
                    rb.left.push(e.id);
                }
            }
            rb.checkpoints.push(f.checkpoint);
        }
        Some(rb)
    }

    /// Rule 5: commits the topmost explicit entry, and returns its id.
    pub fn commit_own(&mut self) -> Result<SpecId, StackError> {
        self.commit_own_with(|_| {})
    }

    /// [`SpecStack::commit_own`], telling `folded` the index each emptied
    /// frame had when it went (see [`SpecStack::remove_with`]).
    pub fn commit_own_with(&mut self, folded: impl FnMut(usize)) -> Result<SpecId, StackError> {
        let id = self.top_explicit().ok_or(StackError::NoSpeculation)?;
        self.remove_with(id, folded);
        Ok(id)
    }

    /// Rule 6: removes every entry for `id`, folding emptied frames down.
    /// Returns false if the VM did not hold `id`.
    pub fn remove(&mut self, id: SpecId) -> bool {
        self.remove_with(id, |_| {})
    }

    /// [`SpecStack::remove`], telling `folded` the index (0 is the oldest)
    /// each emptied frame had when it was removed, in order: state kept
    /// beside the stack by level, such as a disk's overlays, folds the
    /// same way (level 0 into what is below every checkpoint).
    pub fn remove_with(&mut self, id: SpecId, mut folded: impl FnMut(usize)) -> bool {
        let mut found = false;
        let mut i = 0;
        while i < self.frames.len() {
            let f = &mut self.frames[i];
            let before = f.entries.len();
            f.entries.retain(|e| e.id != id);
            found |= f.entries.len() != before;
            if f.entries.is_empty() {
                folded(i);
                let f = self.frames.remove(i);
                if i > 0 {
                    f.checkpoint.fold_into(&mut self.frames[i - 1].checkpoint);
                }
                // With no frame below, the undo information is not needed.
            } else {
                i += 1;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A model machine: memory is a map of page -> value; a checkpoint is
    /// an undo log of the values pages had when it was taken.
    #[derive(Default, Debug)]
    struct Undo(BTreeMap<u32, u32>);

    impl Fold for Undo {
        fn fold_into(self, older: &mut Self) {
            for (k, v) in self.0 {
                older.0.entry(k).or_insert(v);
            }
        }
    }

    struct Machine {
        mem: BTreeMap<u32, u32>,
        stack: SpecStack<Undo>,
    }

    impl Machine {
        fn new() -> Self {
            Self {
                mem: BTreeMap::new(),
                stack: SpecStack::new(7, 16),
            }
        }
        fn write(&mut self, page: u32, val: u32) {
            let old = self.mem.get(&page).copied().unwrap_or(0);
            if let Some(top) = self.stack.top_mut() {
                top.0.entry(page).or_insert(old);
            }
            self.mem.insert(page, val);
        }
        fn read(&self, page: u32) -> u32 {
            self.mem.get(&page).copied().unwrap_or(0)
        }
        fn apply(&mut self, rb: Rollback<Undo>) {
            for cp in rb.checkpoints {
                for (k, v) in cp.0 {
                    self.mem.insert(k, v);
                }
            }
        }
        fn speculate(&mut self) -> SpecId {
            self.stack.speculate(Undo::default()).unwrap()
        }
        fn abort(&mut self) -> Vec<SpecId> {
            let rb = self.stack.abort_own().unwrap();
            let aborted = rb.aborted.clone();
            self.apply(rb);
            aborted
        }
    }

    #[test]
    fn ids_are_fresh_and_carry_the_vm() {
        let mut m = Machine::new();
        let a = m.speculate();
        let b = m.speculate();
        assert_ne!(a, b);
        assert_eq!(a.vm, 7);
        assert_eq!(SpecId::from_u64(a.to_u64()), a);
        assert_eq!(a.to_string(), "7:1");
    }

    #[test]
    fn abort_restores_the_checkpoint() {
        let mut m = Machine::new();
        m.write(1, 10);
        let a = m.speculate();
        m.write(1, 11);
        m.write(2, 20);
        assert_eq!(m.abort(), vec![a]);
        assert_eq!((m.read(1), m.read(2)), (10, 0));
        assert_eq!(m.stack.depth(), 0);
    }

    #[test]
    fn nested_abort_pops_only_the_inner() {
        let mut m = Machine::new();
        let a = m.speculate();
        m.write(1, 1);
        let _b = m.speculate();
        m.write(1, 2);
        m.abort();
        assert_eq!(m.read(1), 1);
        assert_eq!(m.stack.deps(), vec![a]);
        m.abort();
        assert_eq!(m.read(1), 0);
    }

    #[test]
    fn commit_folds_so_outer_abort_restores_outer_state() {
        let mut m = Machine::new();
        m.write(3, 30);
        let a = m.speculate();
        m.write(1, 1);
        let b = m.speculate();
        m.write(1, 2);
        m.write(3, 31);
        assert_eq!(m.stack.commit_own(), Ok(b));
        assert_eq!(m.stack.deps(), vec![a]);
        assert_eq!(m.read(1), 2, "commit keeps the work");
        m.abort();
        assert_eq!((m.read(1), m.read(3)), (0, 30), "outer state restored");
    }

    #[test]
    fn commit_of_the_outer_keeps_the_inner() {
        let mut m = Machine::new();
        let _a = m.speculate();
        m.write(1, 1);
        let b = m.speculate();
        m.write(1, 2);
        // commit() takes the topmost explicit: b. Then a.
        assert_eq!(m.stack.commit_own(), Ok(b));
        let a2 = m.stack.commit_own().unwrap();
        assert_eq!(a2.seq, 1);
        assert_eq!(m.stack.depth(), 0);
        assert_eq!(m.read(1), 2);
        assert_eq!(m.stack.commit_own(), Err(StackError::NoSpeculation));
        assert!(m.stack.abort_own().is_err());
    }

    #[test]
    fn remote_abort_rolls_back_to_before_the_first_tagged_packet() {
        let mut m = Machine::new();
        let t = SpecId { vm: 9, seq: 4 };
        m.write(1, 1);
        assert_eq!(m.stack.missing(&[t, t]), vec![t]);
        m.stack.join(&[t], Undo::default()).unwrap();
        m.write(1, 2); // the packet's effect
        let own = m.speculate(); // a speculation of our own, on top
        m.write(2, 5);
        assert!(m.stack.missing(&[t]).is_empty(), "already joined");
        let rb = m.stack.rollback_to(t).unwrap();
        assert_eq!(
            rb.aborted,
            vec![own],
            "own explicit entry popped is aborted"
        );
        assert_eq!(rb.left, vec![t]);
        m.apply(rb);
        assert_eq!((m.read(1), m.read(2)), (1, 0));
        assert!(
            m.stack.rollback_to(t).is_none(),
            "repeated ABORT changes nothing"
        );
    }

    #[test]
    fn remote_commit_removes_every_entry_and_folds() {
        let mut m = Machine::new();
        let t = SpecId { vm: 9, seq: 1 };
        let u = SpecId { vm: 8, seq: 1 };
        let a = m.speculate();
        m.write(1, 1);
        m.stack.join(&[t, u], Undo::default()).unwrap();
        m.write(1, 2);
        assert!(m.stack.remove(t));
        assert_eq!(m.stack.depth(), 2, "u still holds the shared frame");
        assert!(m.stack.remove(u));
        assert!(!m.stack.remove(u), "repeated COMMIT changes nothing");
        assert_eq!(m.stack.deps(), vec![a]);
        m.abort();
        assert_eq!(m.read(1), 0, "folded undo reaches a's state");
    }

    #[test]
    fn commit_with_implicit_entries_above_keeps_them() {
        let mut m = Machine::new();
        let t = SpecId { vm: 9, seq: 1 };
        let a = m.speculate();
        m.write(1, 1);
        m.stack.join(&[t], Undo::default()).unwrap();
        m.write(1, 2);
        assert_eq!(m.stack.commit_own(), Ok(a));
        assert_eq!(m.stack.deps(), vec![t]);
        let rb = m.stack.rollback_to(t).unwrap();
        m.apply(rb);
        assert_eq!(m.read(1), 1, "back to just before t's packet");
    }

    #[test]
    fn depth_is_bounded() {
        let mut s: SpecStack<Undo> = SpecStack::new(1, 2);
        s.speculate(Undo::default()).unwrap();
        s.speculate(Undo::default()).unwrap();
        assert_eq!(s.speculate(Undo::default()), Err(StackError::TooDeep(2)));
    }
}
