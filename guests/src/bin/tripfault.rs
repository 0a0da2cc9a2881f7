//! Prints a line, then executes `ud2`. A bare guest has no IDT, so the #UD
//! becomes a triple fault, which the VMM must report with the guest RIP
//! instead of hanging.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    rt::print!("tripfault: about to fault\n");
    // SAFETY: ud2 only raises #UD; the VMM ends the VM there.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    5
}
