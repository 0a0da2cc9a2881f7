//! The nested-speculation memory hog of issue 12: before each nested
//! `speculate()` the guest rewrites the same block of memory, so every
//! checkpoint's flush keeps another copy of it on the host. Without a
//! budget, 64 levels over 16 MiB would make the VMM hold 1 GiB.
//!
//! `--guest-arg` is the block's size in MiB (16 when zero). The guest
//! speculates until the VMM refuses, prints
//! `spec_hog: N levels, then <error>`, and commits every level. Exit 0
//! when it ran to a refusal (NO_BUDGET or TOO_DEEP) and committed.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{commit, speculate, Error};

const PAGE: u64 = 4096;

/// Writes one word in every page of `mib` MiB at `base`, with `seed`.
fn dirty(base: u64, mib: u64, seed: u64) {
    for p in 0..(mib << 20) / PAGE {
        // SAFETY: the caller keeps base..base+mib MiB inside free RAM.
        unsafe { ((base + p * PAGE) as *mut u64).write_volatile(seed ^ p) };
    }
}

#[no_mangle]
fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let mib = if arg == 0 { 16 } else { arg };
    if free_base + (mib << 20) > mem_size {
        rt::println!("spec_hog: {mib} MiB do not fit");
        return 1;
    }
    let mut levels = 0u64;
    let refusal = loop {
        dirty(free_base, mib, levels + 1);
        match speculate() {
            Ok(0) => levels += 1,
            Ok(r) => {
                rt::println!("spec_hog: rolled back ({r}) though nothing aborted");
                return 2;
            }
            Err(e) => break e,
        }
    };
    let name = match refusal {
        Error::NoBudget => "NO_BUDGET",
        Error::TooDeep => "TOO_DEEP",
        e => {
            rt::println!("spec_hog: speculate failed with {e:?}");
            return 3;
        }
    };
    rt::println!("spec_hog: {levels} levels, then {name}");
    for _ in 0..levels {
        if let Err(e) = commit() {
            rt::println!("spec_hog: commit failed: {e:?}");
            return 4;
        }
    }
    rt::println!("spec_hog: committed every level");
    0
}
