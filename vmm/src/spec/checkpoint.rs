//! A checkpoint of the whole machine: every vCPU, the VM's in-kernel
//! devices, the device models, and memory's part.

use crate::devices::bus::DeviceState;
use crate::spec::memory::MemoryCheckpoint;
use crate::spec::stack::Fold;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// Everything needed to put the VM back where it was.
pub struct Checkpoint {
    /// Every vCPU's state, by index.
    pub vcpus: Vec<Box<VcpuState>>,
    /// The irqchips, PIT and clock.
    pub vm: VmState,
    /// The device models' state, in the order of the VM's stateful devices.
    pub devices: Vec<DeviceState>,
    /// The vCPU whose `speculate` hypercall took this checkpoint, if any
    /// (a checkpoint taken by the host or on a packet has none). On a
    /// rollback its RAX becomes the reason, so `speculate` returns again.
    pub caller: Option<u8>,
    /// Memory's part, kept by the memory tracker.
    pub memory: MemoryCheckpoint,
}

impl Fold for Checkpoint {
    fn fold_into(self, older: &mut Self) {
        // Only memory needs folding: the older checkpoint's machine state is
        // its own, complete already.
        self.memory.fold_into(&mut older.memory);
    }
}
