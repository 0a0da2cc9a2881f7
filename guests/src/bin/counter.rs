//! Counts forever: increments a counter in memory and prints it about
//! every 100 ms (`counter: N`), for snapshot tests, which check that a
//! restored VM goes on from where it was saved, not from 0.
//!
//! With a non-zero argument, first writes that many MiB of memory (from
//! the free area), so snapshots of it have memory to carry (benchmarks).
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use core::sync::atomic::{AtomicU64, Ordering};

/// The counter, in guest memory.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Ticks between prints when the TSC rate is unknown.
const TICKS_UNKNOWN: u64 = 200_000_000;

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let fill = (arg << 20).min(mem_size.saturating_sub(free_base));
    for off in (0..fill).step_by(4096) {
        let p = (free_base + off) as *mut u64;
        // SAFETY: the free area from `free_base` to the end of memory is
        // the program's own, identity-mapped and unused by anything else.
        unsafe { p.write_volatile(off | 1) };
    }
    rt::println!("counter: filled {} MiB", fill >> 20);
    let interval = match rt::tsc_khz() {
        0 => TICKS_UNKNOWN,
        khz => khz * 100,
    };
    let mut last = rt::rdtsc();
    loop {
        COUNTER.fetch_add(1, Ordering::Relaxed);
        let now = rt::rdtsc();
        // A TSC that went backwards (a restore on another host) counts as
        // a full interval.
        if now < last || now - last >= interval {
            last = now;
            rt::println!("counter: {}", COUNTER.load(Ordering::Relaxed));
        }
    }
}
