//! The boot CPU's local APIC: its two local interrupt lines wired as on a
//! PC, so interrupts from the legacy PIC and NMIs reach it before the guest
//! programs the APIC itself. And what a save reads in a local APIC's state
//! ([`apic_enabled`]).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the APIC page.
const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode ExtINT (bits 8..=10).
const DELIVERY_EXTINT: u32 = 0b111;
/// Delivery mode NMI.
const DELIVERY_NMI: u32 = 0b100;

fn reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in state.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

/// Offset of the spurious-interrupt vector register.
const APIC_SVR: usize = 0xf0;
/// Its APIC software-enable bit.
const APIC_SW_ENABLE: u32 = 1 << 8;

/// Whether the local APIC in `state` is software-enabled. INIT sets the
/// whole spurious-interrupt vector register to 0xff (Intel SDM vol. 3,
/// "Local APIC state after it has been software disabled"; KVM's
/// `kvm_lapic_reset` does the same), so an enabled APIC has taken in no
/// INIT since the guest last enabled it.
pub fn apic_enabled(state: &kvm_lapic_state) -> bool {
    reg(state, APIC_SVR) & APIC_SW_ENABLE != 0
}

fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, in `state`.
pub fn wire_lints(state: &mut kvm_lapic_state) {
    let lint0 = reg(state, APIC_LVT_LINT0);
    set_reg(
        state,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, DELIVERY_EXTINT),
    );
    let lint1 = reg(state, APIC_LVT_LINT1);
    set_reg(
        state,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, DELIVERY_NMI),
    );
}

/// Wires the local interrupt lines of `vcpu`'s in-kernel local APIC.
pub fn setup_lints(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut state = vcpu.get_lapic()?;
    wire_lints(&mut state);
    vcpu.set_lapic(&state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lints_get_their_delivery_modes() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT_LINT0, 0x0001_0000);
        wire_lints(&mut s);
        assert_eq!(reg(&s, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(reg(&s, APIC_LVT_LINT1), 0x0000_0400);
    }
}
