//! Putting a saved machine into a freshly built VM, through the one
//! restore function that rollbacks use too ([`crate::machine::restore`]),
//! in its [`RestoreMode::Snapshot`] mode.
//!
//! Everything that can refuse is checked first (vCPU count, the devices),
//! so a snapshot that does not fit is refused before any state is written:
//! the VM is never half restored.

use super::{SnapshotError, VmSnapshot};
use crate::device_manager::DeviceManager;
use crate::machine::{self, MachineError, RestoreMode, VcpuTarget};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

/// vCPUs whose threads have not started: restored through their file
/// descriptors.
struct Unstarted<'a>(&'a mut [Vcpu]);

impl VcpuTarget for Unstarted<'_> {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn restore_vcpu(
        &mut self,
        index: usize,
        state: VcpuState,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), MachineError> {
        let v = self
            .0
            .get_mut(index)
            .ok_or_else(|| MachineError::Vcpu(index, "no such vCPU".into()))?;
        Ok(v.restore_with_tsc(&state, tsc_advance_ns)?)
    }
}

/// Restores `snap` into a VM whose memory already holds the snapshot's,
/// whose vCPUs have not run, and whose devices were built as the
/// snapshot's were (network backends may differ).
///
/// First it waits for the check of the base memory layer when that runs
/// before the start (`--verify before-start`), so no vCPU runs on memory
/// that was not checked; otherwise the check begins here, beside the guest.
pub fn restore_machine(
    vm: &mut Vm,
    vcpus: &mut [Vcpu],
    devices: &DeviceManager,
    snap: VmSnapshot,
) -> Result<(), SnapshotError> {
    snap.memory_check.wait()?;
    let mode = RestoreMode::Snapshot {
        saved_at_ns: snap.saved_at_ns,
    };
    machine::restore(vm, &mut Unstarted(vcpus), devices, snap.machine, mode)?;
    snap.memory_check.begin_beside_guest();
    Ok(())
}

/// Refuses to restore a Linux guest into a VMM whose host-compat layer is
/// not in the state the guest was saved in. A guest saved with it has its
/// LSTAR at the system-call trampoline, which only the layer serves, and
/// was booted with the layer's CPUID and command line; a guest saved
/// without it would bypass the trampoline, since its kernel does not write
/// LSTAR again. Bare guests use no trampoline and may go either way.
pub fn check_host_compat(snap: &VmSnapshot, compat_active: bool) -> Result<(), SnapshotError> {
    if !snap.linux {
        return Ok(());
    }
    match (&snap.trampoline, compat_active) {
        (Some(t), false) if t.installed() => Err(SnapshotError::Mismatch(format!(
            "the guest's LSTAR points at the host-compat system-call trampoline \
             (kernel entry {:#x}), and host compat is off now, so its system calls \
             would fail; restore with --host-compat on",
            t.kernel_lstar
        ))),
        (Some(_), false) => Err(SnapshotError::Mismatch(
            "the Linux guest was saved with host compat on (its CPUID and command line \
             are the layer's), and host compat is off now; restore with --host-compat on"
                .into(),
        )),
        (None, true) => Err(SnapshotError::Mismatch(
            "the Linux guest was saved with host compat off, and host compat is on now: \
             its system calls would bypass the trampoline; restore with --host-compat off"
                .into(),
        )),
        _ => Ok(()),
    }
}
