//! The checkpoint benchmark's guest. `--guest-arg` = N | (R << 32): N pages
//! dirtied between operations (default 100), R repetitions (default 5).
//!
//! Each repetition:
//! 1. dirty N pages, then `speculate` (the checkpoint flushes those N pages);
//! 2. dirty N pages, then `abort` (the rollback reverts those N pages);
//! 3. dirty N pages, `speculate`, dirty N pages, `commit`.
//!
//! The VMM's `--stats` line gives the time of each operation (a guest-side
//! clock would not do: the rollback takes the guest's own memory of when
//! it called `abort` back with it). Exit 0 on success.
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
    let reps = match arg >> 32 {
        0 => 5,
        r => r,
    };
    if free_base + n * PAGE > mem_size {
        rt::println!("spec_bench: {n} pages do not fit in {mem_size:#x} bytes");
        return 2;
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
