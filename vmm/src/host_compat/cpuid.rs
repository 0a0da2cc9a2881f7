//! The reduced guest CPUID for hosts whose KVM emulates guest kernel code.
//!
//! `KVM_GET_SUPPORTED_CPUID` on `kvm_pvm` reports the host CPU's features,
//! but the instruction emulator that runs guest CPL0 code cannot execute
//! many of them (HOST-KVM.md, "What the emulator cannot run at CPL0"). A
//! guest that trusts the report takes those code paths and dies. Each bit
//! below is hidden for a reason:
//! - measured failing in the emulator: CX16 (`cmpxchg16b`, Linux's SLUB dies
//!   on it), XSAVE and its family (`xsave`, `xrstor`, `xgetbv`: FPU init
//!   dies), AVX and AVX-512 (VEX/EVEX encodings), POPCNT, SSSE3
//!   (`palignr`);
//! - not measured but of the same kind (newer SSE/VEX-era encodings, or
//!   instructions KVM's emulator has no entry for): SSE4.1, SSE4.2, MOVBE,
//!   AES, PCLMULQDQ, FMA, F16C, RDRAND, RDSEED, BMI1/2, ADX, SHA, GFNI,
//!   VAES, VPCLMULQDQ, RDPID, FSGSBASE, INVPCID, LZCNT/ABM, SSE4A, XOP,
//!   FMA4, TBM, AMX;
//! - CPU protections whose instructions the emulator lacks: SMAP
//!   (`clac`/`stac`), UMIP, PKU;
//! - KVM's paravirtual wake-ups (leaf 0x4000_0001): PV_UNHALT (spinlock
//!   waiters halt and are kicked by hypercall), PV_SEND_IPI, PV_SCHED_YIELD
//!   and PV_TLB_FLUSH. Not measured to fail: boots with 2 vCPUs stalled
//!   with one vCPU halted for good while the other spun (docs/linux-boot.md),
//!   and these are the paths that put a vCPU to sleep or wake one by
//!   hypercall instead of by the APIC. Only guests with several vCPUs use
//!   them. Whether hiding them cures the stall is not verified yet.
//!
//! `KVM_SET_CPUID2` is only partly honoured on this host (leaf 7 comes
//! through unchanged), so the Linux command line must also clear features;
//! the VMM still sets a deliberate CPUID, so a guest that asks is told the
//! truth wherever the host lets it be.

use kvm_bindings::kvm_cpuid_entry2;

/// A register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One hidden feature: leaf, sub-leaf, register, bit, and its name.
pub type Feature = (u32, u32, Reg, u8, &'static str);

/// Every feature bit the reduced CPUID hides.
pub const HIDDEN: &[Feature] = &[
    (1, 0, Reg::Ecx, 1, "pclmulqdq"),
    (1, 0, Reg::Ecx, 9, "ssse3"),
    (1, 0, Reg::Ecx, 12, "fma"),
    (1, 0, Reg::Ecx, 13, "cx16"),
    (1, 0, Reg::Ecx, 19, "sse4_1"),
    (1, 0, Reg::Ecx, 20, "sse4_2"),
    (1, 0, Reg::Ecx, 22, "movbe"),
    (1, 0, Reg::Ecx, 23, "popcnt"),
    (1, 0, Reg::Ecx, 25, "aes"),
    (1, 0, Reg::Ecx, 26, "xsave"),
    (1, 0, Reg::Ecx, 27, "osxsave"),
    (1, 0, Reg::Ecx, 28, "avx"),
    (1, 0, Reg::Ecx, 29, "f16c"),
    (1, 0, Reg::Ecx, 30, "rdrand"),
    (7, 0, Reg::Ebx, 0, "fsgsbase"),
    (7, 0, Reg::Ebx, 3, "bmi1"),
    (7, 0, Reg::Ebx, 5, "avx2"),
    (7, 0, Reg::Ebx, 8, "bmi2"),
    (7, 0, Reg::Ebx, 10, "invpcid"),
    (7, 0, Reg::Ebx, 16, "avx512f"),
    (7, 0, Reg::Ebx, 17, "avx512dq"),
    (7, 0, Reg::Ebx, 18, "rdseed"),
    (7, 0, Reg::Ebx, 19, "adx"),
    (7, 0, Reg::Ebx, 20, "smap"),
    (7, 0, Reg::Ebx, 21, "avx512ifma"),
    (7, 0, Reg::Ebx, 26, "avx512pf"),
    (7, 0, Reg::Ebx, 27, "avx512er"),
    (7, 0, Reg::Ebx, 28, "avx512cd"),
    (7, 0, Reg::Ebx, 29, "sha_ni"),
    (7, 0, Reg::Ebx, 30, "avx512bw"),
    (7, 0, Reg::Ebx, 31, "avx512vl"),
    (7, 0, Reg::Ecx, 1, "avx512vbmi"),
    (7, 0, Reg::Ecx, 2, "umip"),
    (7, 0, Reg::Ecx, 3, "pku"),
    (7, 0, Reg::Ecx, 4, "ospke"),
    (7, 0, Reg::Ecx, 6, "avx512_vbmi2"),
    (7, 0, Reg::Ecx, 8, "gfni"),
    (7, 0, Reg::Ecx, 9, "vaes"),
    (7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    (7, 0, Reg::Ecx, 11, "avx512_vnni"),
    (7, 0, Reg::Ecx, 12, "avx512_bitalg"),
    (7, 0, Reg::Ecx, 14, "avx512_vpopcntdq"),
    (7, 0, Reg::Ecx, 22, "rdpid"),
    (7, 0, Reg::Edx, 2, "avx512_4vnniw"),
    (7, 0, Reg::Edx, 3, "avx512_4fmaps"),
    (7, 0, Reg::Edx, 8, "avx512_vp2intersect"),
    (7, 0, Reg::Edx, 22, "amx_bf16"),
    (7, 0, Reg::Edx, 23, "avx512_fp16"),
    (7, 0, Reg::Edx, 24, "amx_tile"),
    (7, 0, Reg::Edx, 25, "amx_int8"),
    (7, 1, Reg::Eax, 4, "avx_vnni"),
    (7, 1, Reg::Eax, 5, "avx512_bf16"),
    (0x8000_0001, 0, Reg::Ecx, 5, "abm"),
    (0x8000_0001, 0, Reg::Ecx, 6, "sse4a"),
    (0x8000_0001, 0, Reg::Ecx, 11, "xop"),
    (0x8000_0001, 0, Reg::Ecx, 16, "fma4"),
    (0x8000_0001, 0, Reg::Ecx, 21, "tbm"),
    (0x4000_0001, 0, Reg::Eax, 7, "kvm_pv_unhalt"),
    (0x4000_0001, 0, Reg::Eax, 9, "kvm_pv_tlb_flush"),
    (0x4000_0001, 0, Reg::Eax, 11, "kvm_pv_send_ipi"),
    (0x4000_0001, 0, Reg::Eax, 13, "kvm_pv_sched_yield"),
];

/// The XSAVE state leaf: emptied entirely, since XSAVE is hidden.
const XSAVE_LEAF: u32 = 0xd;

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Hides every [`HIDDEN`] feature in `entries` and empties the XSAVE leaf.
/// Returns the names of the features that were present and are now hidden.
pub fn reduce(entries: &mut [kvm_cpuid_entry2]) -> Vec<&'static str> {
    let mut hidden = Vec::new();
    for e in entries.iter_mut() {
        if e.function == XSAVE_LEAF {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
            continue;
        }
        for &(leaf, sub, reg, bit, name) in HIDDEN {
            if e.function == leaf && e.index == sub {
                let r = reg_mut(e, reg);
                if *r & (1 << bit) != 0 {
                    *r &= !(1 << bit);
                    hidden.push(name);
                }
            }
        }
    }
    hidden
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn hides_the_listed_bits_and_keeps_the_rest() {
        let sse2 = 1 << 26;
        let mut e = vec![
            entry(1, 0, 0, u32::MAX, sse2),
            entry(7, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(XSAVE_LEAF, 0, 1, 1, 1),
            entry(0x8000_0001, 0, 0, 1 << 5, 0),
        ];
        let hidden = reduce(&mut e);
        for name in [
            "cx16", "xsave", "avx", "popcnt", "ssse3", "avx2", "avx512f", "smap", "abm",
        ] {
            assert!(hidden.contains(&name), "{name} not hidden");
        }
        assert_eq!(e[0].ecx & (1 << 13), 0, "cx16");
        assert_eq!(e[0].ecx & (1 << 23), 0, "popcnt");
        assert_ne!(e[0].ecx & 1, 0, "sse3 must stay");
        assert_eq!(e[0].edx, sse2, "leaf 1 edx untouched");
        assert_eq!(e[1].ebx & (1 << 5), 0, "avx2");
        assert_ne!(e[1].ebx & (1 << 9), 0, "erms must stay");
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 0, 0, 0));
        assert_eq!(e[3].ecx, 0);
    }

    #[test]
    fn kvm_pv_wakeups_are_hidden_and_kvmclock_kept() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: (1 << 3) | (1 << 7) | (1 << 11),
            ..Default::default()
        }];
        let hidden = reduce(&mut e);
        assert!(hidden.contains(&"kvm_pv_unhalt") && hidden.contains(&"kvm_pv_send_ipi"));
        assert_eq!(e[0].eax, 1 << 3, "CLOCKSOURCE2 stays");
    }

    #[test]
    fn absent_bits_are_not_reported() {
        let mut e = vec![entry(1, 0, 0, 0, 0)];
        assert!(reduce(&mut e).is_empty());
    }

    #[test]
    fn other_subleaves_untouched() {
        let mut e = vec![entry(7, 2, u32::MAX, u32::MAX, u32::MAX)];
        reduce(&mut e);
        assert_eq!((e[0].ebx, e[0].ecx), (u32::MAX, u32::MAX));
    }
}
