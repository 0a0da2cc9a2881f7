//! The per-vCPU parts of the guest CPUID, as on any KVM host.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;

/// Sets the entries that differ per vCPU: the initial APIC ID in leaf 1
/// and the x2APIC ID in the topology leaves, and marks the hypervisor bit.
pub fn set_vcpu_identity(entries: &mut [kvm_cpuid_entry2], apic_id: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24);
                e.ecx |= HYPERVISOR_BIT;
            }
            0xb | 0x1f => e.edx = u32::from(apic_id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_id_lands_in_leaf_1_and_0xb() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xaa00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 9,
                ..Default::default()
            },
        ];
        set_vcpu_identity(&mut e, 3);
        assert_eq!(e[0].ebx, 0x0300_0800);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(e[1].edx, 3);
    }
}
