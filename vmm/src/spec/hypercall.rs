//! The hypercall device: the guest's door to the speculation engine.
//!
//! The guest writes an operation number to [`HYPERCALL_PORT`]; the device
//! turns it into a [`VcpuTrap`], and the vCPU hands itself to the
//! controller, which reads the argument registers, acts on the whole VM,
//! and writes the results. The ABI is in `guest_agent::abi` and
//! `docs/guest-abi.md`.
//!
//! [`HYPERCALL_PORT`]: guest_agent::abi::HYPERCALL_PORT

use crate::devices::{BusDevice, VcpuTrap};

/// The hypercall device. It keeps no state: the checkpoint stack lives in
/// the controller, outside guest-visible device state, so a rollback never
/// rewinds it.
#[derive(Debug, Default)]
pub struct HypercallDevice;

impl BusDevice for HypercallDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}

    fn write_trap(&mut self, offset: u64, data: &[u8]) -> Option<VcpuTrap> {
        // Only a 4-byte write at the base is a hypercall; anything else is
        // ignored, as a real device would.
        match (offset, data) {
            (0, &[a, b, c, d]) => Some(VcpuTrap::Hypercall(u32::from_le_bytes([a, b, c, d]))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dword_writes_at_the_base_trap() {
        let mut d = HypercallDevice;
        assert_eq!(d.write_trap(0, &[1, 0, 0, 0]), Some(VcpuTrap::Hypercall(1)));
        assert_eq!(
            d.write_trap(0, &[0xef, 0xbe, 0xad, 0xde]),
            Some(VcpuTrap::Hypercall(0xdead_beef))
        );
        assert_eq!(d.write_trap(0, &[1]), None);
        assert_eq!(d.write_trap(1, &[1, 0, 0]), None);
    }
}
