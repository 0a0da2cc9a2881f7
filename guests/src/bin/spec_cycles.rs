//! Many speculate/abort cycles, for leak checks and timing.
//!
//! N = `--guest-arg` cycles (1000 when zero); each speculates, dirties 16
//! pages, and aborts. The rollback count is kept on the non-zero return
//! path of `speculate()`, the only place where an update survives.
//!
//! Pause protocol, for a host that measures the VMM between the phases:
//! after 100 cycles (or all of them, if fewer) the guest prints
//! `spec_cycles: phase 1` and waits for one byte on the serial input; after
//! the rest it prints `spec_cycles: phase 2` and waits again; then it
//! prints the timing and `spec_cycles: ok`.
//!
//! Exit status 0 on success; the failing check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::abi::reason::ABORTED_BY_GUEST;
use guest_agent::hypercall::{abort, speculate, status};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Pages dirtied by every cycle.
const PAGES: u64 = 16;
/// Cycles before the first pause.
const PHASE1_CYCLES: u64 = 100;

fn fill(base: u64, seed: u64) {
    for i in 0..PAGES * WORDS {
        // SAFETY: `main` checked that base..base + PAGES * PAGE is free RAM.
        unsafe { ((base + i * 8) as *mut u64).write_volatile(seed ^ i) };
    }
}

/// The first word index that does not hold `fill(base, seed)`'s value.
fn first_bad(base: u64, seed: u64) -> Option<u64> {
    (0..PAGES * WORDS).find(|&i| {
        // SAFETY: as in `fill`.
        let v = unsafe { ((base + i * 8) as *const u64).read_volatile() };
        v != seed ^ i
    })
}

/// Running totals, updated only after rollbacks.
struct Totals {
    rollbacks: u64,
    ticks: u64,
}

/// One cycle: speculate, dirty the pages, abort; back here, check them.
fn cycle(base: u64, n: u64, t: &mut Totals) -> Result<(), u32> {
    let start = rt::rdtsc();
    match speculate() {
        Ok(0) => {
            fill(base, 0xdead_0000 ^ n);
            let e = abort();
            rt::println!("spec_cycles: cycle {n}: abort returned {e:?}");
            return Err(3);
        }
        Ok(r) if r != ABORTED_BY_GUEST => {
            rt::println!("spec_cycles: cycle {n}: speculate returned {r}");
            return Err(4);
        }
        Ok(_) => {}
        Err(e) => {
            rt::println!("spec_cycles: cycle {n}: speculate failed: {e:?}");
            return Err(5);
        }
    }
    t.ticks += rt::rdtsc().wrapping_sub(start);
    t.rollbacks += 1;
    if let Some(i) = first_bad(base, PRE) {
        rt::println!("spec_cycles: cycle {n}: word {i} not restored");
        return Err(6);
    }
    if status().depth != 0 {
        rt::println!(
            "spec_cycles: cycle {n}: depth {} after the rollback",
            status().depth
        );
        return Err(7);
    }
    Ok(())
}

/// The pages' content outside speculations.
const PRE: u64 = 0x5bec_c7c1_e500_0000;

/// Prints the phase line and waits for one byte of serial input.
fn pause(phase: u32) {
    rt::println!("spec_cycles: phase {phase}");
    let _ = rt::console().read_byte();
}

fn report(n: u64, t: &Totals) {
    let khz = rt::tsc_khz();
    if khz == 0 {
        let per = t.ticks / n.max(1);
        rt::println!(
            "spec_cycles: {n} cycles, {} TSC ticks, {per} ticks/cycle (TSC rate unknown)",
            t.ticks
        );
        return;
    }
    let total_us = u128::from(t.ticks) * 1000 / u128::from(khz);
    let per_ns = u128::from(t.ticks) * 1_000_000 / u128::from(khz) / u128::from(n.max(1));
    rt::println!("spec_cycles: {n} cycles, total {total_us} us, {per_ns} ns/cycle");
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let n = if arg == 0 { 1000 } else { arg };
    if free_base + PAGES * PAGE > mem_size {
        rt::println!("spec_cycles: {PAGES} pages do not fit");
        return 2;
    }
    fill(free_base, PRE);
    let mut t = Totals {
        rollbacks: 0,
        ticks: 0,
    };
    let first = n.min(PHASE1_CYCLES);
    for i in 0..n {
        if i == first {
            pause(1);
        }
        if let Err(code) = cycle(free_base, i, &mut t) {
            return code;
        }
    }
    if first == n {
        pause(1);
    }
    if t.rollbacks != n {
        rt::println!(
            "spec_cycles: {} rollbacks counted, expected {n}",
            t.rollbacks
        );
        return 8;
    }
    pause(2);
    report(n, &t);
    rt::println!("spec_cycles: {n} rollbacks");
    rt::println!("spec_cycles: ok");
    0
}
