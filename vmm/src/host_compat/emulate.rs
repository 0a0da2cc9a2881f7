//! Completion of instructions that the host's KVM cannot emulate.
//!
//! How each was found: HOST-KVM.md records that on `kvm_pvm`, guest kernel
//! code (CPL0) runs in KVM's instruction emulator, and that these end
//! `KVM_RUN` with `KVM_EXIT_INTERNAL_ERROR` (emulation) and the instruction
//! bytes in the exit:
//! - `int3` (`cc`): Linux's own int3 self-test in `alternative_instructions`
//!   and every text-poke. Completed as the CPU would: RIP moves past it and
//!   #BP (a trap) is injected, so the guest's own handler runs.
//! - `int n` (`cd nn`): the same for software interrupts. Vectors below 32
//!   are injected as exceptions; higher ones as an interrupt, since KVM's
//!   soft-interrupt injection needs an instruction length this exit lacks.
//!   Unlike the CPU, this skips the gate's DPL check.
//! - `clac` / `stac` (`0f 01 ca` / `0f 01 cb`): patched in for SMAP even
//!   with `nosmap`; a probe boot completed 4,311 of them. They clear or set
//!   RFLAGS.AC.
//! - `fwait` (`9b`): a no-op when no x87 exception is pending, which is the
//!   only state the guest reaches here (x87 exceptions are masked).

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;

/// RFLAGS.AC, the alignment-check / SMAP override flag.
const RFLAGS_AC: u64 = 1 << 18;
/// The #BP vector.
const BP_VECTOR: u8 = 3;

/// An instruction this layer completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `int3`.
    Int3,
    /// `int n`.
    IntN(u8),
    /// `clac`.
    Clac,
    /// `stac`.
    Stac,
    /// `fwait`.
    Fwait,
}

impl Insn {
    /// Its length in bytes.
    pub fn size(self) -> u64 {
        match self {
            Insn::Int3 | Insn::Fwait => 1,
            Insn::IntN(_) => 2,
            Insn::Clac | Insn::Stac => 3,
        }
    }
}

/// Decodes the instruction at the start of `b`, if it is one this layer
/// completes. Instructions with prefixes are not completed.
pub fn decode(b: &[u8]) -> Option<Insn> {
    match b {
        [0xcc, ..] => Some(Insn::Int3),
        [0xcd, n, ..] => Some(Insn::IntN(*n)),
        [0x9b, ..] => Some(Insn::Fwait),
        [0x0f, 0x01, 0xca, ..] => Some(Insn::Clac),
        [0x0f, 0x01, 0xcb, ..] => Some(Insn::Stac),
        _ => None,
    }
}

/// An event to inject after completing an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// An exception vector (below 32), without error code.
    Exception(u8),
    /// An interrupt vector (32 and above).
    Interrupt(u8),
}

/// The registers after `insn` executes, and the event it raises.
pub fn apply(insn: Insn, regs: &kvm_regs) -> (kvm_regs, Option<Inject>) {
    let mut r = *regs;
    r.rip = r.rip.wrapping_add(insn.size());
    let inject = match insn {
        Insn::Int3 => Some(Inject::Exception(BP_VECTOR)),
        Insn::IntN(n) if n < 32 => Some(Inject::Exception(n)),
        Insn::IntN(n) => Some(Inject::Interrupt(n)),
        Insn::Clac => {
            r.rflags &= !RFLAGS_AC;
            None
        }
        Insn::Stac => {
            r.rflags |= RFLAGS_AC;
            None
        }
        Insn::Fwait => None,
    };
    (r, inject)
}

/// Completes `insn_bytes` on `vcpu`. Returns the instruction, or `None`
/// if they are not one this layer completes.
pub fn complete(vcpu: &VcpuFd, insn_bytes: &[u8]) -> Result<Option<Insn>, kvm_ioctls::Error> {
    let Some(insn) = decode(insn_bytes) else {
        return Ok(None);
    };
    let (regs, inject) = apply(insn, &vcpu.get_regs()?);
    vcpu.set_regs(&regs)?;
    if let Some(inject) = inject {
        let mut ev = vcpu.get_vcpu_events()?;
        match inject {
            Inject::Exception(nr) => {
                ev.exception.injected = 1;
                ev.exception.nr = nr;
                ev.exception.has_error_code = 0;
                ev.exception.error_code = 0;
            }
            Inject::Interrupt(nr) => {
                ev.interrupt.injected = 1;
                ev.interrupt.nr = nr;
                ev.interrupt.soft = 0;
            }
        }
        vcpu.set_vcpu_events(&ev)?;
    }
    tracing::trace!(?insn, rip = regs.rip, "completed instruction");
    Ok(Some(insn))
}

/// A short human name for the instruction at the start of `b`, for error
/// messages about instructions nobody completes.
pub fn describe(b: &[u8]) -> String {
    if let Some(i) = decode(b) {
        return format!("{i:?}");
    }
    // Skip legacy and REX prefixes to find the opcode.
    let body: &[u8] = {
        let n = b
            .iter()
            .take_while(|&&x| {
                matches!(
                    x,
                    0x66 | 0x67
                        | 0xf0
                        | 0xf2
                        | 0xf3
                        | 0x2e
                        | 0x3e
                        | 0x26
                        | 0x36
                        | 0x64
                        | 0x65
                        | 0x40..=0x4f
                )
            })
            .count();
        &b[n..]
    };
    let name = match body {
        [] => "no instruction bytes available",
        [0x0f, 0xb8, ..] if b.contains(&0xf3) => "popcnt",
        [0x0f, 0xc7, m, ..] if (m >> 3) & 7 == 1 && b.iter().any(|x| (0x48..=0x4f).contains(x)) => {
            "cmpxchg16b"
        }
        [0x0f, 0xc7, m, ..] if (m >> 3) & 7 == 1 => "cmpxchg8b",
        [0x0f, 0x01, 0xd0, ..] => "xgetbv",
        [0x0f, 0xae, m, ..] if (m >> 3) & 7 == 4 => "xsave",
        [0x0f, 0xae, m, ..] if (m >> 3) & 7 == 5 => "xrstor",
        [0x0f, 0x3a, 0x0f, ..] => "palignr",
        [0xc4 | 0xc5, ..] => "a VEX-encoded (AVX) instruction",
        [0x62, ..] => "an EVEX-encoded (AVX-512) instruction",
        _ => "an instruction the emulator does not support",
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_it_completes() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Insn::Int3));
        assert_eq!(decode(&[0xcd, 0x80]), Some(Insn::IntN(0x80)));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), Some(Insn::Clac));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]), Some(Insn::Stac));
        assert_eq!(decode(&[0x9b]), Some(Insn::Fwait));
        assert_eq!(decode(&[0xcd]), None, "truncated int n");
        assert_eq!(decode(&[0x0f, 0x01]), None);
        assert_eq!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25]), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn applies_like_the_cpu() {
        let regs = kvm_regs {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        };
        let (r, i) = apply(Insn::Int3, &regs);
        assert_eq!((r.rip, i), (0x1001, Some(Inject::Exception(3))));
        let (r, i) = apply(Insn::IntN(0x80), &regs);
        assert_eq!((r.rip, i), (0x1002, Some(Inject::Interrupt(0x80))));
        let (r, i) = apply(Insn::IntN(6), &regs);
        assert_eq!((r.rip, i), (0x1002, Some(Inject::Exception(6))));
        let (r, _) = apply(Insn::Stac, &regs);
        assert_eq!((r.rip, r.rflags), (0x1003, 0x2 | RFLAGS_AC));
        let (r, _) = apply(Insn::Clac, &r);
        assert_eq!((r.rip, r.rflags), (0x1006, 0x2));
        let (r, i) = apply(Insn::Fwait, &regs);
        assert_eq!((r.rip, i), (0x1001, None));
    }

    #[test]
    fn names_unsupported_instructions() {
        assert_eq!(describe(&[0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25]), "popcnt");
        assert_eq!(describe(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), "cmpxchg16b");
        assert_eq!(describe(&[0x0f, 0x01, 0xd0]), "xgetbv");
        assert_eq!(
            describe(&[0xc5, 0xfc, 0x77]),
            "a VEX-encoded (AVX) instruction"
        );
        assert_eq!(describe(&[]), "no instruction bytes available");
    }
}
