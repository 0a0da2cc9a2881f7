//! Prints numbered lines of 64 bytes as fast as the console takes them,
//! for tests of console readers that are slow or absent: `--guest-arg N`
//! prints N lines and exits 0; 0 prints for ever. The high 32 bits of the
//! argument, if set, are MiB of memory to write first (one word a page),
//! for a snapshot whose memory layer takes a while to check.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let fill = ((arg >> 32) << 20).min(mem_size.saturating_sub(free_base));
    for off in (0..fill).step_by(4096) {
        let p = (free_base + off) as *mut u64;
        // SAFETY: the free area is the guest's own, mapped read-write.
        unsafe { p.write_volatile(off | 1) };
    }
    let lines = arg & 0xffff_ffff;
    let mut n: u64 = 0;
    while lines == 0 || n < lines {
        n += 1;
        // "chatter " (8) + 12 digits + " " + 42 letters + "\n" = 64 bytes.
        rt::println!("chatter {n:012} abcdefghijklmnopqrstuvwxyzabcdefghijklmnop");
    }
    0
}
