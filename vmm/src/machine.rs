//! The machine's state as one value, and the one function that puts it
//! back.
//!
//! A [`MachineState`] is every vCPU, the VM's in-kernel devices and the
//! device models. A speculation checkpoint holds one in memory (beside its
//! memory undo log), and a snapshot holds one on disk (beside its memory
//! layers); both restore it through [`restore`], in the one order
//! documented there. What differs is the [`RestoreMode`]: a rollback keeps
//! the guest's clocks running, a restore from disk moves them forward by
//! the time the VM spent on disk.

use kvm_bindings::{kvm_clock_data, kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::device_manager::{DeviceError, DeviceManager, DeviceStates};
use crate::persist::{Decode, DecodeError, Encode, Persist, Reader, Writer};
use crate::vstate::vcpu_state::{StateError, VcpuState, MSR_IA32_TSC};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::VmState;

/// Errors saving or restoring the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A KVM state ioctl failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A device's state could not be saved or restored.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The state has another number of vCPUs than the VM.
    #[error("the saved state has {saved} vCPUs, the VM {have}")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs of the VM.
        have: usize,
    },
    /// A vCPU could not be reached or restored.
    #[error("vCPU {0}: {1}")]
    Vcpu(usize, String),
}

/// Everything of the machine but its memory.
pub struct MachineState {
    /// Every vCPU's state, by index.
    pub vcpus: Vec<VcpuState>,
    /// The irqchips, PIT and KVM clock.
    pub vm: VmState,
    /// The device models.
    pub devices: DeviceStates,
}

/// Why the machine is being restored, which decides its clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// A rollback: the guest's KVM clock and TSC keep running forward
    /// (SPECULATIONS.md, Time), so neither is set back.
    Rollback,
    /// A restore from disk into a new VM, whose clocks start near zero:
    /// both move to the saved values plus the time since `saved_at_ns`
    /// (host CLOCK_REALTIME), so the guest's time never runs backwards.
    Snapshot {
        /// When the state was saved.
        saved_at_ns: u64,
    },
}

/// The vCPUs as [`restore`] reaches them: through their threads while the
/// VM runs, or through their file descriptors before the threads start.
pub trait VcpuTarget {
    /// How many vCPUs the VM has.
    fn count(&self) -> usize;
    /// Restores vCPU `index` (parked, or not started) to `state`, then, with
    /// `tsc_advance_ns`, moves its TSC to the saved value plus that time.
    fn restore_vcpu(
        &mut self,
        index: usize,
        state: VcpuState,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), MachineError>;
    /// Restores every vCPU, `states` by index (one per vCPU); a target
    /// whose vCPUs have threads of their own may do them at once.
    fn restore_all(
        &mut self,
        states: Vec<VcpuState>,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), MachineError> {
        for (i, s) in states.into_iter().enumerate() {
            self.restore_vcpu(i, s, tsc_advance_ns)?;
        }
        Ok(())
    }
}

/// Puts the machine back into `state`. Nothing of the guest may run: the
/// vCPUs are parked (or not started) and the devices' I/O is held.
///
/// The state is checked against the VM first (vCPU count, devices), so a
/// state that does not fit is refused before anything changes. Then, in
/// this order:
/// 1. the in-kernel irqchips and PIT, so the local APIC state the vCPUs
///    restore meets its interrupt controllers;
/// 2. for a snapshot, the KVM clock (a rollback rewrites the current clock
///    instead, which makes KVM republish it to the rolled-back kvmclock
///    pages);
/// 3. each vCPU, whose own order is explained in `vcpu_state::restore`,
///    and for a snapshot its TSC (the vCPUs are independent of each
///    other: a running VM's threads restore theirs at the same time);
/// 4. the device models, last: they are only read by the vCPUs, which do
///    not run yet.
pub fn restore(
    vm: &mut Vm,
    vcpus: &mut dyn VcpuTarget,
    devices: &DeviceManager,
    state: MachineState,
    mode: RestoreMode,
) -> Result<(), MachineError> {
    if vcpus.count() != state.vcpus.len() {
        return Err(MachineError::VcpuCount {
            saved: state.vcpus.len(),
            have: vcpus.count(),
        });
    }
    devices.check_fits(&state.devices)?;
    let advance = match mode {
        RestoreMode::Rollback => None,
        RestoreMode::Snapshot { saved_at_ns } => {
            Some(crate::snapshot::now_ns().saturating_sub(saved_at_ns))
        }
    };
    vm.restore(&state.vm)?;
    if let Some(elapsed) = advance {
        set_clock(vm, state.vm.clock.clock.saturating_add(elapsed))?;
    }
    vcpus.restore_all(state.vcpus, advance)?;
    devices.restore(&state.devices)?;
    Ok(())
}

/// Sets the KVM clock to `ns`.
fn set_clock(vm: &Vm, ns: u64) -> Result<(), StateError> {
    let c = kvm_clock_data {
        clock: ns,
        ..Default::default()
    };
    vm.fd
        .set_clock(&c)
        .map_err(|e| StateError("KVM_SET_CLOCK", e))
}

/// Moves the vCPU's TSC to the saved value plus `elapsed` ns at the vCPU's
/// TSC rate. `vcpu_state::restore` leaves the TSC alone (a rollback keeps
/// it running); a new VM's TSC starts near zero.
pub fn advance_tsc(fd: &VcpuFd, s: &VcpuState, elapsed: u64) -> Result<(), StateError> {
    let Some(saved) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC) else {
        return Ok(());
    };
    let khz = u64::from(fd.get_tsc_khz().unwrap_or(0));
    let ticks = (u128::from(elapsed) * u128::from(khz) / 1_000_000) as u64;
    let entry = kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: saved.data.saturating_add(ticks),
        ..Default::default()
    };
    let m = Msrs::from_entries(&[entry]).map_err(|_| {
        StateError(
            "building the TSC MSR list",
            kvm_ioctls::Error::new(libc::E2BIG),
        )
    })?;
    fd.set_msrs(&m)
        .map_err(|e| StateError("KVM_SET_MSRS (TSC)", e))?;
    Ok(())
}

impl Encode for MachineState {
    /// The vCPUs (a count, then each), the VM, the devices.
    fn encode(&self, w: &mut Writer) {
        w.u32(self.vcpus.len() as u32);
        self.vcpus.iter().for_each(|v| v.encode(w));
        self.vm.encode(w);
        self.devices.encode(w);
    }
}

impl Decode for MachineState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.count(64, "vCPU count")?;
        if n == 0 || n > usize::from(crate::config::MAX_VCPUS) {
            return Err(DecodeError(format!("{n} vCPUs")));
        }
        let vcpus = (0..n)
            .map(|_| VcpuState::decode(r))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vcpus,
            vm: VmState::decode(r)?,
            devices: DeviceStates::decode(r)?,
        })
    }
}
