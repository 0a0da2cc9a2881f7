//! Saving and restoring the VM-wide in-kernel devices: the two PICs, the
//! IOAPIC, the PIT, and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::vcpu_state::StateError;
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};

/// The in-kernel device state of a VM.
#[derive(Clone)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: [kvm_irqchip; 3],
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock when the state was saved.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Saves the VM's in-kernel device state. The vCPUs must be paused.
pub fn save(vm: &VmFd) -> Result<VmState, StateError> {
    let mut irqchips = [kvm_irqchip::default(); 3];
    for (chip, id) in irqchips.iter_mut().zip(CHIPS) {
        chip.chip_id = id;
        vm.get_irqchip(chip)
            .map_err(|e| StateError("KVM_GET_IRQCHIP", e))?;
    }
    let pit = vm.get_pit2().map_err(|e| StateError("KVM_GET_PIT2", e))?;
    let clock = vm.get_clock().map_err(|e| StateError("KVM_GET_CLOCK", e))?;
    Ok(VmState {
        irqchips,
        pit,
        clock,
    })
}

/// Restores the interrupt controllers and the PIT from `state`.
///
/// The KVM clock is *not* set back: on rollback the guest's clock must read
/// the present, not the time of the checkpoint. Instead the current clock is
/// written again, which makes KVM refresh every vCPU's kvmclock page (the
/// guest memory holding it was just rolled back to an older copy).
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip)
            .map_err(|e| StateError("KVM_SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&state.pit)
        .map_err(|e| StateError("KVM_SET_PIT2", e))?;
    refresh_clock(vm)
}

/// Writes the current KVM clock back, so KVM republishes it to the guest.
pub fn refresh_clock(vm: &VmFd) -> Result<(), StateError> {
    let mut now = vm.get_clock().map_err(|e| StateError("KVM_GET_CLOCK", e))?;
    // Only the clock value may be passed back in; the other flags
    // describe how it was read.
    now.flags = 0;
    vm.set_clock(&now)
        .map_err(|e| StateError("KVM_SET_CLOCK", e))
}

impl Encode for VmState {
    fn encode(&self, w: &mut Writer) {
        self.irqchips.iter().for_each(|c| w.pod(c));
        w.pod(&self.pit);
        w.pod(&self.clock);
    }
}

impl Decode for VmState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(VmState {
            irqchips: [r.pod("PIC master")?, r.pod("PIC slave")?, r.pod("IOAPIC")?],
            pit: r.pod("PIT")?,
            clock: r.pod("KVM clock")?,
        })
    }
}
