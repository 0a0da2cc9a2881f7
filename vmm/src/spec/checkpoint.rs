//! A speculation checkpoint: the [`MachineState`] (the same value a
//! snapshot holds on disk) and the memory undo log.

use crate::machine::MachineState;
use crate::spec::memory::UndoLog;
use crate::spec::stack::Fold;

/// Everything needed to put the VM back where it was.
pub struct Checkpoint {
    /// The vCPUs, the in-kernel devices and the device models.
    pub machine: MachineState,
    /// The vCPU whose `speculate` hypercall took this checkpoint, if any
    /// (a checkpoint taken by the host or on a packet has none). On a
    /// rollback its RAX becomes the reason, so `speculate` returns again.
    pub caller: Option<u8>,
    /// Pre-images of the memory pages changed since this checkpoint.
    pub undo: UndoLog,
    /// With `--checkpoint full-copy` (the naive peer of the benchmarks):
    /// all of guest memory, copied.
    pub full_copy: Option<Vec<u8>>,
}

impl Fold for Checkpoint {
    fn fold_into(self, older: &mut Self) {
        // Only memory needs folding: the older checkpoint's machine state is
        // its own, complete already.
        self.undo.fold_into(&mut older.undo);
    }
}
