//! The checkpoint benchmark's guest. `--guest-arg` = N | (R << 32) | (L << 63):
//! N pages dirtied between operations (default 100), R repetitions
//! (default 5, at most 2^31 - 1), L the round-trip mode below.
//!
//! Each repetition:
//! 1. dirty N pages, then `speculate` (the checkpoint flushes those N pages);
//! 2. dirty N pages, then `abort` (the rollback reverts those N pages);
//! 3. dirty N pages, `speculate`, dirty N pages, `commit`.
//!
//! The VMM's `--stats` line gives the time of each operation (a guest-side
//! clock would not do: the rollback takes the guest's own memory of when
//! it called `abort` back with it). Exit 0 on success.
//!
//! Round-trip mode (L = 1): prints `spec_bench: loop start`, then R times
//! `speculate`, dirty N pages, `abort`, then `spec_bench: loop end`. The
//! host times the two lines: guest-driven round trips per second. The
//! count survives the rollbacks because it is raised after `speculate`
//! returns from the abort, outside the speculation.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{abort, commit, speculate};

const PAGE: u64 = 4096;

/// Writes one word in each of `pages` pages from `base`.
fn dirty(base: u64, pages: u64, v: u64) {
    for p in 0..pages {
        // SAFETY: the caller checked that the pages lie in free guest RAM.
        unsafe { ((base + p * PAGE) as *mut u64).write_volatile(v ^ p) };
    }
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let n = match arg & 0xffff_ffff {
        0 => 100,
        n => n,
    };
    let reps = match (arg >> 32) & 0x7fff_ffff {
        0 => 5,
        r => r,
    };
    let round_trips = arg >> 63 == 1;
    if free_base + n * PAGE > mem_size {
        rt::println!("spec_bench: {n} pages do not fit in {mem_size:#x} bytes");
        return 2;
    }
    if round_trips {
        return round_trip_loop(free_base, n, reps);
    }
    for r in 0..reps {
        dirty(free_base, n, r);
        match speculate() {
            Ok(0) => {
                dirty(free_base, n, !r);
                let e = abort();
                rt::println!("spec_bench: abort failed: {e:?}");
                return 3;
            }
            Ok(_) => {}
            Err(e) => {
                rt::println!("spec_bench: speculate failed: {e:?}");
                return 4;
            }
        }
        dirty(free_base, n, r + 1);
        match speculate() {
            Ok(0) => {
                dirty(free_base, n, r + 2);
                if commit().is_err() {
                    return 5;
                }
            }
            _ => return 6,
        }
    }
    rt::println!("spec_bench: {reps} repetitions with {n} dirty pages, ok");
    0
}

/// `reps` guest-driven round trips: `speculate`, dirty `n` pages, `abort`.
fn round_trip_loop(free_base: u64, n: u64, reps: u64) -> u32 {
    rt::println!("spec_bench: loop start");
    let mut done = 0u64;
    while done < reps {
        match speculate() {
            Ok(0) => {
                dirty(free_base, n, done);
                let e = abort();
                rt::println!("spec_bench: abort failed: {e:?}");
                return 3;
            }
            // Back from the abort: memory holds the count as it was at
            // `speculate`, so this increment is the one that stays.
            Ok(_) => done += 1,
            Err(e) => {
                rt::println!("spec_bench: speculate failed: {e:?}");
                return 4;
            }
        }
    }
    rt::println!("spec_bench: loop end");
    rt::println!("spec_bench: {reps} round trips with {n} dirty pages, ok");
    0
}
