//! Prints one line over serial and exits 0: the smallest end-to-end check
//! of loading, entry, port I/O and the exit device.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    rt::print!("hello from a bare specvm guest\n");
    0
}
