//! Time never runs backwards across a rollback (SPECULATIONS.md, "Time").
//!
//! One long round: read the TSC, speculate, spin ~50 ms inside, abort;
//! after the rollback the TSC must be later than anything read inside,
//! so at least the spin past the value read before. Then 200 quick rounds
//! (no spin), each checking that the TSC after the rollback is later than
//! the one before the speculation and than the previous round's.
//!
//! A rollback rewinds memory, so the guest cannot carry a value read inside
//! the speculation past it. It prints those values instead (`in` lines),
//! and the value read after the rollback (`out` lines), so a host test can
//! compare each pair exactly:
//!
//!     spec_time: long in <tsc>        spec_time: long out <tsc>
//!     spec_time: quick <i> in <tsc>   spec_time: quick <i> out <tsc>
//!
//! Exit status 0 on success; the failing check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::abi::reason::ABORTED_BY_GUEST;
use guest_agent::hypercall::{abort, speculate, status};

/// The spin of the long round.
const SPIN_MS: u64 = 50;
/// The spin, in TSC ticks, when the TSC rate is unknown.
const SPIN_TICKS_UNKNOWN: u64 = 100_000_000;
/// Quick rounds.
const QUICK: u64 = 200;

/// Prints the failed check and returns its code from the enclosing function.
macro_rules! check {
    ($cond:expr, $code:expr, $($msg:tt)*) => {
        if !$cond {
            rt::println!("spec_time: check {} failed: {}", $code, format_args!($($msg)*));
            return Err($code);
        }
    };
}

/// Speculates; on the first return runs `inside` and aborts, and on the
/// second returns Ok. `code` (and `code + 1`) on failures.
fn speculate_abort(inside: impl FnOnce(), code: u32) -> Result<(), u32> {
    match speculate() {
        Ok(0) => {
            inside();
            let e = abort();
            rt::println!("spec_time: check {code} failed: abort returned {e:?}");
            Err(code)
        }
        Ok(r) => {
            check!(r == ABORTED_BY_GUEST, code + 1, "speculate returned {r}");
            Ok(())
        }
        Err(e) => {
            rt::println!(
                "spec_time: check {} failed: speculate failed: {e:?}",
                code + 1
            );
            Err(code + 1)
        }
    }
}

fn long_round() -> Result<u64, u32> {
    let khz = rt::tsc_khz();
    let ticks = if khz == 0 {
        SPIN_TICKS_UNKNOWN
    } else {
        khz * SPIN_MS
    };
    let before = rt::rdtsc();
    speculate_abort(
        || {
            let start = rt::rdtsc();
            while rt::rdtsc().wrapping_sub(start) < ticks {
                core::hint::spin_loop();
            }
            rt::println!("spec_time: long in {}", rt::rdtsc());
        },
        10,
    )?;
    let after = rt::rdtsc();
    rt::println!("spec_time: long out {after}");
    check!(
        after > before && after - before > ticks,
        12,
        "TSC {after} after the rollback, {before} before the speculation, \
         but {ticks} ticks were spent inside it"
    );
    check!(
        status().depth == 0,
        13,
        "depth {} after the rollback",
        status().depth
    );
    let gap_us = ((after - before) * 1000).checked_div(khz).unwrap_or(0);
    rt::println!(
        "spec_time: long round: {} ticks ({gap_us} us) across the rollback",
        after - before
    );
    Ok(after)
}

/// The quick rounds; `last` is the TSC read after the long round.
fn quick_rounds(mut last: u64) -> Result<(), u32> {
    let mut max_gap = 0;
    for i in 0..QUICK {
        let before = rt::rdtsc();
        check!(
            before > last,
            20,
            "round {i}: TSC {before} before speculating, {last} earlier"
        );
        speculate_abort(
            || rt::println!("spec_time: quick {i} in {}", rt::rdtsc()),
            21,
        )?;
        let after = rt::rdtsc();
        rt::println!("spec_time: quick {i} out {after}");
        check!(
            after > before,
            23,
            "round {i}: TSC {after} after the rollback, {before} before"
        );
        max_gap = max_gap.max(after - before);
        last = after;
    }
    rt::println!("spec_time: {QUICK} quick rounds, at most {max_gap} ticks across a rollback");
    Ok(())
}

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    rt::println!("spec_time: TSC at {} kHz", rt::tsc_khz());
    match long_round().and_then(quick_rounds) {
        Ok(()) => {
            rt::println!("spec_time: ok");
            0
        }
        Err(code) => code,
    }
}
