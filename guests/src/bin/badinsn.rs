//! Executes an instruction that KVM's emulator cannot complete, so that
//! `KVM_RUN` fails with an emulation error that the VMM must report.
//!
//! `popcnt` runs natively at CPL3, but its operand here lies in the MMIO
//! hole (3..4 GiB) where no device is: the access exits to KVM, which must
//! emulate the whole instruction to complete it, and its emulator has no
//! `popcnt`. Exit status 4 means the instruction completed after all.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

/// An address in the MMIO hole with no device behind it.
const UNBACKED_MMIO: u64 = guest_agent::abi::UNCLAIMED_MMIO;

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    rt::print!("badinsn: about to fault\n");
    let count: u64;
    // SAFETY: the VMM identity-maps 3..4 GiB for MMIO, so the read is
    // mapped; it has no effect on this program's memory. The address goes
    // through a register: as a 32-bit displacement an address above 2 GiB would be
    // sign-extended to 0xffffffffd0000000. Encoding: f3 48 0f b8 00.
    unsafe {
        core::arch::asm!(
            "popcnt rax, qword ptr [rax]",
            inout("rax") UNBACKED_MMIO => count,
            options(nostack, readonly),
        );
    }
    rt::println!("badinsn: popcnt completed ({count}); expected an emulation failure");
    4
}
