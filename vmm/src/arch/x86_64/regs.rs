//! Initial register state of a vCPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{flat_segments, tss_segment, KERNEL_CS, KERNEL_DS, TSS_SEL, USER_CS, USER_DS};
use super::layout::{GDT_ADDR, TSS_ADDR, TSS_LIMIT};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set.
const RFLAGS_FIXED: u64 = 1 << 1;
/// I/O privilege level 3: `in` and `out` are allowed at CPL3.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Long-mode control registers and segments for a vCPU that starts in
/// 64-bit user mode (CPL3), on top of the vCPU's current `sregs`.
pub fn user_mode_sregs(base: &kvm_sregs, cr3: u64) -> kvm_sregs {
    let mut s = *base;
    let segs = flat_segments();
    s.cs = segs[4].kvm(USER_CS);
    let data = segs[3].kvm(USER_DS);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss_segment(TSS_ADDR, TSS_LIMIT).kvm(TSS_SEL);
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (7 * 8 - 1) as u16;
    // No IDT: an exception in a bare guest ends in a triple fault, which the
    // VMM reports with the guest RIP.
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = cr3;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// Long-mode control registers and segments for a vCPU that starts in
/// 64-bit kernel mode (CPL0), as the Linux 64-bit boot protocol asks:
/// flat code and data segments, paging on with `cr3`, interrupts off.
pub fn kernel_mode_sregs(base: &kvm_sregs, cr3: u64) -> kvm_sregs {
    let mut s = user_mode_sregs(base, cr3);
    let segs = flat_segments();
    s.cs = segs[1].kvm(KERNEL_CS);
    let data = segs[2].kvm(KERNEL_DS);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s
}

/// General registers for a Linux boot CPU at its 64-bit `entry`: RSI
/// points at the boot parameters, interrupts are off.
pub fn linux_boot_regs(entry: u64, zero_page: u64, stack: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: zero_page,
        rsp: stack,
        rbp: stack,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    }
}

/// General registers for a bare guest: entry point, stack, and the
/// arguments in RDI, RSI, RDX and RCX (the SysV order).
pub fn bare_regs(entry: u64, stack: u64, args: [u64; 4]) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        rcx: args[3],
        rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// The FPU state after `fninit`, with SSE exceptions masked.
pub fn default_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_mode_is_cpl3_long_mode() {
        let s = user_mode_sregs(&kvm_sregs::default(), 0x1000);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.tr.type_, 0xb);
        let r = bare_regs(0x40_0000, 0x3f_fff8, [1, 2, 3, 4]);
        assert_eq!(r.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!((r.rdi, r.rsi, r.rdx, r.rcx), (1, 2, 3, 4));
    }

    #[test]
    fn kernel_mode_is_cpl0_long_mode() {
        let s = kernel_mode_sregs(&kvm_sregs::default(), 0x1000);
        assert_eq!((s.cs.dpl, s.cs.selector, s.cs.l), (0, KERNEL_CS, 1));
        assert_eq!((s.ss.dpl, s.ds.selector), (0, KERNEL_DS));
        assert_ne!(s.efer & EFER_LMA, 0);
        let r = linux_boot_regs(0x100_0000, 0x7000, 0x8ff0);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, 0x7000, RFLAGS_FIXED));
    }
}
