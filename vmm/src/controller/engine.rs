//! The speculation engine: the operations of `SPECULATIONS.md` on one VM,
//! over a small [`Machine`] trait that takes and restores checkpoints.
//!
//! [`SpecStack`] holds the rules of the stack (who owns what, which frame
//! an abort returns to, what a commit folds). The engine adds when the
//! machine must be saved or put back, and what each operation tells the
//! rest of the VMM ([`Aborted`], [`Joined`]); the controller turns that
//! into events, bridge messages and output commit. Neither knows KVM: the
//! tests below drive the engine with a machine that is one number.

use guest_agent::abi::err;

use super::ControlError;
use crate::spec::stack::{Entry, Fold, Rollback, SpecId, SpecStack, StackError};

/// What the engine needs of the machine.
pub trait Machine {
    /// A saved machine.
    type Checkpoint: Fold;
    /// Saves the machine; `top` is the newest checkpoint held, if any (the
    /// memory written since it was taken is recorded there). `caller` is
    /// the vCPU whose `speculate` this is.
    fn checkpoint(
        &mut self,
        caller: Option<u8>,
        top: Option<&mut Self::Checkpoint>,
    ) -> Result<Self::Checkpoint, ControlError>;
    /// Puts the machine back to the last of `popped` (newest first, as
    /// [`Rollback::checkpoints`]), which was the checkpoint at `level` (0
    /// is the oldest). If that checkpoint was taken by a vCPU's
    /// `speculate`, the call returns again there with `why`.
    fn rollback(
        &mut self,
        popped: Vec<Self::Checkpoint>,
        level: usize,
        why: u64,
    ) -> Result<(), ControlError>;
    /// The checkpoint at `level` was committed and folded into the one
    /// below (for level 0: there is none; what it protected is final).
    /// State kept beside the stack by level folds the same way.
    fn fold(&mut self, level: usize) -> Result<(), ControlError>;
}

/// A checkpoint that holds host memory, which the budget counts.
pub trait Held {
    /// Bytes of host memory the checkpoint holds.
    fn held_bytes(&self) -> u64;
}

/// Why a checkpoint was refused for memory: what the checkpoints hold,
/// and the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// Bytes the checkpoints hold.
    pub held: u64,
    /// The budget in bytes.
    pub budget: u64,
}

/// What an abort undid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aborted {
    /// The speculation that was aborted.
    pub id: SpecId,
    /// This VM's own speculations that the rollback ended, to broadcast
    /// (the aborted one and any nested in it).
    pub own: Vec<SpecId>,
}

/// What a tagged frame's arrival did (rule 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The VM already held every id.
    AlreadyHeld,
    /// It joined these, on one new checkpoint.
    Joined(Vec<SpecId>),
    /// The stack was full, or the checkpoints held their memory budget
    /// (then with the figures): it cannot join these, and must refuse
    /// their frames.
    Refused(Vec<SpecId>, Option<OverBudget>),
}

/// The speculations of one VM.
pub struct SpecEngine<C> {
    stack: SpecStack<C>,
    /// Most host memory the checkpoints may hold before a new one is
    /// refused; `None` for no limit.
    budget: Option<u64>,
    /// The last refusal for memory, for the host's event.
    refused: Option<OverBudget>,
}

impl<C: Fold + Held> SpecEngine<C> {
    /// An engine whose stack holds at most `max_depth` checkpoints, whose
    /// checkpoints may hold `budget` bytes of host memory (then new ones
    /// are refused), and which numbers this VM's speculations from
    /// `first_seq`.
    pub fn new(vm: u32, max_depth: usize, first_seq: u32, budget: Option<u64>) -> Self {
        Self {
            stack: SpecStack::with_first_seq(vm, max_depth, first_seq),
            budget,
            refused: None,
        }
    }

    /// Host memory the checkpoints hold now.
    pub fn held_bytes(&self) -> u64 {
        self.stack.checkpoints().map(Held::held_bytes).sum()
    }

    /// Whether a new checkpoint is refused for memory. The rule: once the
    /// checkpoints hold the budget, no new one is taken. (A checkpoint's
    /// flush adds the pages written since the previous one, at most all of
    /// guest memory, so what they hold stays below budget + guest memory.)
    fn over_budget(&mut self) -> Option<OverBudget> {
        let budget = self.budget?;
        let held = self.held_bytes();
        let r = (held >= budget).then_some(OverBudget { held, budget });
        self.refused = r;
        r
    }

    /// The last refusal for memory, once.
    pub fn take_refusal(&mut self) -> Option<OverBudget> {
        self.refused.take()
    }

    /// Checkpoints held.
    pub fn depth(&self) -> usize {
        self.stack.depth()
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.stack.entries()
    }

    /// The speculations this VM's output depends on (rule 7).
    pub fn deps(&self) -> Vec<SpecId> {
        self.stack.deps()
    }

    /// Whether the VM holds `id`.
    pub fn holds(&self, id: SpecId) -> bool {
        self.stack.holds(id)
    }

    /// Takes a checkpoint and starts a speculation of this VM's own
    /// (rule 1). The machine must be paused. The inner error is a
    /// hypercall error code.
    pub fn speculate<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        caller: Option<u8>,
    ) -> Result<Result<SpecId, u64>, ControlError> {
        if let Err(StackError::TooDeep(_)) = self.stack.can_push() {
            return Ok(Err(err::TOO_DEEP));
        }
        if self.over_budget().is_some() {
            return Ok(Err(err::NO_BUDGET));
        }
        let cp = m.checkpoint(caller, self.stack.top_mut())?;
        let id = self
            .stack
            .speculate(cp)
            .map_err(|e| ControlError::Vcpu(e.to_string()))?;
        Ok(Ok(id))
    }

    /// Commits the innermost own speculation (rule 5); the machine keeps
    /// its state and folds what it keeps by level. The inner error is a
    /// hypercall error code.
    pub fn commit_own<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
    ) -> Result<Result<SpecId, u64>, ControlError> {
        let mut levels = Vec::new();
        let Ok(id) = self.stack.commit_own_with(|l| levels.push(l)) else {
            return Ok(Err(err::NO_SPECULATION));
        };
        levels.into_iter().try_for_each(|l| m.fold(l))?;
        Ok(Ok(id))
    }

    /// Aborts the innermost own speculation (rule 3): the machine rolls
    /// back, and its `speculate` returns `why`. The machine must be paused.
    /// The inner error is a hypercall error code.
    pub fn abort_own<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        why: u64,
    ) -> Result<Result<Aborted, u64>, ControlError> {
        let Some(id) = self.stack.top_explicit() else {
            return Ok(Err(err::NO_SPECULATION));
        };
        let rb = self
            .stack
            .abort_own()
            .map_err(|e| ControlError::Vcpu(e.to_string()))?;
        Ok(Ok(self.roll_back(m, rb, id, why)?))
    }

    /// Joins the speculations a tagged frame carries, on one checkpoint,
    /// before the guest sees the frame (rule 2). The machine must be
    /// paused.
    pub fn join<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        ids: &[SpecId],
    ) -> Result<Joined, ControlError> {
        let missing = self.stack.missing(ids);
        if missing.is_empty() {
            return Ok(Joined::AlreadyHeld);
        }
        if self.stack.can_push().is_err() {
            return Ok(Joined::Refused(missing, None));
        }
        if let Some(o) = self.over_budget() {
            return Ok(Joined::Refused(missing, Some(o)));
        }
        let cp = m.checkpoint(None, self.stack.top_mut())?;
        self.stack
            .join(&missing, cp)
            .map_err(|e| ControlError::Vcpu(e.to_string()))?;
        Ok(Joined::Joined(missing))
    }

    /// `id`'s owner committed it (rule 6): every entry for it goes, folded
    /// down. Returns whether the VM held it.
    pub fn remote_commit<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        id: SpecId,
    ) -> Result<bool, ControlError> {
        let mut levels = Vec::new();
        let held = self.stack.remove_with(id, |l| levels.push(l));
        levels.into_iter().try_for_each(|l| m.fold(l))?;
        Ok(held)
    }

    /// `id`'s owner aborted it (rule 4): back to just before the first
    /// frame tagged `id` reached this VM. `None` if the VM does not hold
    /// it. The machine must be paused (when [`SpecEngine::holds`] says so).
    pub fn remote_abort<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        id: SpecId,
        why: u64,
    ) -> Result<Option<Aborted>, ControlError> {
        match self.stack.rollback_to(id) {
            // A joined frame: no vCPU's call returns there, so the reason
            // is unused. The VM's own frame (the bridge aborted its
            // speculation: its lease lapsed, or a shared registry refused
            // its start): `speculate()` returns again with `why`, never 0
            // as if it had just begun.
            Some(rb) => Ok(Some(self.roll_back(m, rb, id, why)?)),
            None => Ok(None),
        }
    }

    /// The oldest speculation this VM joined, whose outcome is lost when
    /// the bridge is (rule 9): the one to roll back to.
    pub fn oldest_joined(&self) -> Option<SpecId> {
        self.stack
            .entries()
            .into_iter()
            .find(|e| !e.explicit)
            .map(|e| e.id)
    }

    fn roll_back<M: Machine<Checkpoint = C>>(
        &mut self,
        m: &mut M,
        rb: Rollback<C>,
        id: SpecId,
        why: u64,
    ) -> Result<Aborted, ControlError> {
        let Rollback {
            checkpoints,
            aborted,
            ..
        } = rb;
        m.rollback(checkpoints, self.stack.depth(), why)?;
        Ok(Aborted { id, own: aborted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::abi::reason;

    /// A machine that is one number; a checkpoint remembers it, and which
    /// call took it.
    #[derive(Default)]
    struct Counter {
        value: u64,
        /// `speculate`'s return value per vCPU, as a rollback sets it.
        returned: Option<(u8, u64)>,
        checkpoints: usize,
        rollbacks: usize,
        /// Levels folded, in order, and the level of each rollback.
        folds: Vec<usize>,
        levels: Vec<usize>,
    }

    struct Saved {
        value: u64,
        caller: Option<u8>,
        /// Checkpoints folded into this one by commits.
        folded: usize,
    }

    impl Fold for Saved {
        fn fold_into(self, older: &mut Self) {
            older.folded += 1 + self.folded;
        }
    }

    /// Each checkpoint holds as many bytes as the machine's value then.
    impl Held for Saved {
        fn held_bytes(&self) -> u64 {
            self.value
        }
    }

    impl Machine for Counter {
        type Checkpoint = Saved;
        fn checkpoint(
            &mut self,
            caller: Option<u8>,
            _top: Option<&mut Saved>,
        ) -> Result<Saved, ControlError> {
            self.checkpoints += 1;
            Ok(Saved {
                value: self.value,
                caller,
                folded: 0,
            })
        }
        fn rollback(
            &mut self,
            popped: Vec<Saved>,
            level: usize,
            why: u64,
        ) -> Result<(), ControlError> {
            self.rollbacks += 1;
            self.levels.push(level);
            let target = popped.last().expect("a rollback has a target");
            self.value = target.value;
            self.returned = target.caller.map(|c| (c, why));
            Ok(())
        }
        fn fold(&mut self, level: usize) -> Result<(), ControlError> {
            self.folds.push(level);
            Ok(())
        }
    }

    fn id(vm: u32, seq: u32) -> SpecId {
        SpecId { vm, seq }
    }

    #[test]
    fn abort_puts_the_machine_back_and_speculate_returns_the_reason() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 4, 1, None);
        m.value = 10;
        let a = e.speculate(&mut m, Some(1)).unwrap().unwrap();
        assert_eq!(a, id(7, 1));
        m.value = 20;
        let b = e.speculate(&mut m, Some(0)).unwrap().unwrap();
        m.value = 30;
        let r = e
            .abort_own(&mut m, reason::ABORTED_BY_GUEST)
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            Aborted {
                id: b,
                own: vec![b]
            }
        );
        assert_eq!(m.value, 20);
        assert_eq!(m.levels, vec![1], "back to the second checkpoint");
        assert_eq!(m.returned, Some((0, reason::ABORTED_BY_GUEST)));
        assert_eq!(e.depth(), 1);
        e.abort_own(&mut m, reason::ABORTED_BY_HOST)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.value, m.returned),
            (10, Some((1, reason::ABORTED_BY_HOST)))
        );
        assert_eq!(e.abort_own(&mut m, 0).unwrap(), Err(err::NO_SPECULATION));
        assert_eq!(m.rollbacks, 2);
    }

    #[test]
    fn an_own_speculation_aborted_by_the_bridge_returns_its_reason() {
        for why in [reason::ABORTED_BY_HOST, reason::REFUSED] {
            let mut m = Counter::default();
            let mut e = SpecEngine::new(7, 4, 1, None);
            m.value = 10;
            let a = e.speculate(&mut m, Some(1)).unwrap().unwrap();
            m.value = 20;
            let r = e.remote_abort(&mut m, a, why).unwrap().unwrap();
            assert_eq!(r.own, vec![a]);
            assert_eq!(m.value, 10);
            assert_eq!(m.returned, Some((1, why)));
            assert_eq!(e.depth(), 0);
        }
    }

    #[test]
    fn commit_folds_and_touches_no_machine_state() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 4, 1, None);
        e.speculate(&mut m, None).unwrap().unwrap();
        m.value = 5;
        let inner = e.speculate(&mut m, None).unwrap().unwrap();
        m.value = 6;
        assert_eq!(e.commit_own(&mut m).unwrap(), Ok(inner));
        assert_eq!(m.value, 6, "a commit changes nothing");
        assert_eq!(m.folds, vec![1], "the inner level folds into the outer");
        // The outer checkpoint still restores its own state.
        e.abort_own(&mut m, 0).unwrap().unwrap();
        assert_eq!((m.value, m.levels.clone()), (0, vec![0]));
        assert_eq!(e.commit_own(&mut m).unwrap(), Err(err::NO_SPECULATION));
        e.speculate(&mut m, None).unwrap().unwrap();
        e.commit_own(&mut m).unwrap().unwrap();
        assert_eq!(m.folds, vec![1, 0], "the outermost commit folds level 0");
    }

    #[test]
    fn a_full_stack_refuses_speculate_and_join_without_a_checkpoint() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 2, 1, None);
        e.speculate(&mut m, None).unwrap().unwrap();
        e.join(&mut m, &[id(9, 1)]).unwrap();
        let taken = m.checkpoints;
        assert_eq!(e.speculate(&mut m, None).unwrap(), Err(err::TOO_DEEP));
        assert_eq!(
            e.join(&mut m, &[id(9, 2)]).unwrap(),
            Joined::Refused(vec![id(9, 2)], None)
        );
        assert_eq!(m.checkpoints, taken, "no checkpoint was taken");
    }

    #[test]
    fn once_the_checkpoints_hold_the_budget_new_ones_are_refused() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 64, 1, Some(100));
        m.value = 60;
        e.speculate(&mut m, None).unwrap().unwrap();
        assert_eq!(e.held_bytes(), 60);
        m.value = 50;
        e.speculate(&mut m, None).unwrap().unwrap();
        let taken = m.checkpoints;
        assert_eq!(e.speculate(&mut m, None).unwrap(), Err(err::NO_BUDGET));
        let over = Some(OverBudget {
            held: 110,
            budget: 100,
        });
        assert_eq!(e.take_refusal(), over);
        assert_eq!(
            e.join(&mut m, &[id(9, 1)]).unwrap(),
            Joined::Refused(vec![id(9, 1)], over)
        );
        assert_eq!(m.checkpoints, taken, "no checkpoint was taken");
        // Aborting the inner one frees its memory: speculate works again.
        e.abort_own(&mut m, 0).unwrap().unwrap();
        assert!(e.speculate(&mut m, None).unwrap().is_ok());
    }

    #[test]
    fn a_remote_abort_returns_before_the_first_tagged_frame() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 8, 1, None);
        m.value = 1;
        assert_eq!(
            e.join(&mut m, &[id(9, 1)]).unwrap(),
            Joined::Joined(vec![id(9, 1)])
        );
        assert_eq!(e.join(&mut m, &[id(9, 1)]).unwrap(), Joined::AlreadyHeld);
        m.value = 2;
        let own = e.speculate(&mut m, Some(0)).unwrap().unwrap();
        m.value = 3;
        assert_eq!(e.oldest_joined(), Some(id(9, 1)));
        let r = e
            .remote_abort(&mut m, id(9, 1), reason::ABORTED_BY_HOST)
            .unwrap()
            .unwrap();
        assert_eq!(r.own, vec![own], "the own speculation inside it ends too");
        assert_eq!((m.value, m.levels.clone()), (1, vec![0]));
        assert_eq!(m.returned, None, "no vCPU's call returns at a joined frame");
        assert_eq!(e.depth(), 0);
        assert!(e
            .remote_abort(&mut m, id(9, 1), reason::ABORTED_BY_HOST)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_remote_commit_leaves_the_machine_and_the_dependencies_shrink() {
        let mut m = Counter::default();
        let mut e = SpecEngine::new(7, 8, 1, None);
        e.join(&mut m, &[id(9, 1), id(8, 3)]).unwrap();
        m.value = 4;
        assert!(e.remote_commit(&mut m, id(9, 1)).unwrap());
        assert!(!e.remote_commit(&mut m, id(9, 1)).unwrap());
        assert_eq!(e.deps(), vec![id(8, 3)]);
        assert!(m.folds.is_empty(), "the frame still holds 8:3");
        assert!(e.remote_commit(&mut m, id(8, 3)).unwrap());
        assert_eq!((e.depth(), m.value, m.rollbacks), (0, 4, 0));
        assert_eq!(m.folds, vec![0]);
    }
}
