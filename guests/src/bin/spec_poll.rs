//! Asks for its status in a tight loop while it speculates, for the host
//! to abort meanwhile. `--guest-arg` = the rounds (default 10).
//!
//! Each round: `speculate`; when it returns 0, print `spec_poll: round R
//! polling` and call `status` until the host aborts; when it returns
//! non-zero, print `spec_poll: round R: speculate() = N` and go to the next
//! round. An abort served while a `status` call waits must bring
//! `speculate` back with 2 (the host aborted): the waiting call belongs to
//! the timeline the rollback threw away, so its answer must not land in
//! the checkpoint's registers (it would make `speculate` return 0 again,
//! and the same round poll twice). Each `status` answer must hold: with no
//! network the stack holds only the VM's own speculations, so depth, ids
//! and own ids are the same number, at least 1; a wrong one (the host took
//! a checkpoint while a `status` call waited, then rolled back to it, and
//! the call came back unanswered) is printed as `spec_poll: round R:
//! status() = ...` and ends the guest with 5. Exit 0 after the last round.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{speculate, status};

fn main(_mem_size: u64, _free_base: u64, arg: u64) -> u32 {
    let rounds = match arg {
        0 => 10,
        n => n,
    };
    for round in 0..rounds {
        match speculate() {
            Ok(0) => {
                rt::println!("spec_poll: round {round} polling");
                // Only a rollback leaves this loop.
                loop {
                    let s = status();
                    if s.depth == 0 || s.deps != s.depth || s.own != s.depth {
                        rt::println!(
                            "spec_poll: round {round}: status() = depth {} ids {} own {}",
                            s.depth,
                            s.deps,
                            s.own
                        );
                        return 5;
                    }
                }
            }
            Ok(r) => rt::println!("spec_poll: round {round}: speculate() = {r}"),
            Err(e) => {
                rt::println!("spec_poll: speculate failed: {e:?}");
                return 4;
            }
        }
    }
    rt::println!("spec_poll: {rounds} rounds, ok");
    0
}
