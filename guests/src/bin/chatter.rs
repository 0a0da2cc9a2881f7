//! Prints numbered lines of 64 bytes as fast as the console takes them,
//! for tests of console readers that are slow or absent: `--guest-arg N`
//! prints N lines and exits 0; 0 prints for ever.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

fn main(_mem_size: u64, _free_base: u64, arg: u64) -> u32 {
    let mut n: u64 = 0;
    while arg == 0 || n < arg {
        n += 1;
        // "chatter " (8) + 12 digits + " " + 42 letters + "\n" = 64 bytes.
        rt::println!("chatter {n:012} abcdefghijklmnopqrstuvwxyzabcdefghijklmnop");
    }
    0
}
