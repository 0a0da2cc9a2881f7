//! A speculation checkpoint: the [`MachineState`] (the same value a
//! snapshot holds on disk) and memory's part.

use crate::machine::MachineState;
use crate::spec::memory::MemoryCheckpoint;
use crate::spec::stack::Fold;

/// Everything needed to put the VM back where it was.
pub struct Checkpoint {
    /// The vCPUs, the in-kernel devices and the device models.
    pub machine: MachineState,
    /// The vCPU whose `speculate` hypercall took this checkpoint, if any
    /// (a checkpoint taken by the host or on a packet has none). On a
    /// rollback its RAX becomes the reason, so `speculate` returns again.
    pub caller: Option<u8>,
    /// The hypercalls waiting as the checkpoint was taken, by vCPU (see
    /// [`crate::controller::vcpus::VcpuSet::waiting_calls`]), but the
    /// caller's, whose result the checkpoint holds: a rollback here serves
    /// them again, and drops any call made after it.
    pub calls: Vec<Option<WaitingCall>>,
    /// Memory's part, kept by the memory tracker.
    pub memory: MemoryCheckpoint,
}

/// A hypercall that waited as a checkpoint was taken: which of its vCPU's
/// calls it was, and what it asked, to serve it again after a rollback
/// there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitingCall {
    /// How many of the vCPU's calls were served before it.
    pub seq: u64,
    /// Its op.
    pub op: u32,
    /// Its argument.
    pub arg: u64,
}

impl Fold for Checkpoint {
    fn fold_into(self, older: &mut Self) {
        // Only memory needs folding: the older checkpoint's machine state is
        // its own, complete already.
        self.memory.fold_into(&mut older.memory);
    }
}

impl crate::controller::Held for Checkpoint {
    fn held_bytes(&self) -> u64 {
        self.memory.held_bytes()
    }
}
