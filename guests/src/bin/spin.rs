//! Spins forever without output, for testing that the VMM can be stopped
//! from outside (signal, timeout).
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    loop {
        core::hint::spin_loop()
    }
}
