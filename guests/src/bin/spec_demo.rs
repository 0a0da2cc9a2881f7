//! The demo guest of `scripts/demo`: a speculation of the guest's own that
//! it aborts, one it commits, and one the host aborts through the control
//! API while the guest works.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{abort, commit, speculate, status};

/// A "bank account" in guest memory, which rollbacks restore.
static mut BALANCE: u64 = 100;

fn balance() -> u64 {
    // SAFETY: the guest has one thread; nothing else touches BALANCE.
    unsafe { core::ptr::addr_of!(BALANCE).read_volatile() }
}

fn set_balance(v: u64) {
    // SAFETY: as in `balance`.
    unsafe { core::ptr::addr_of_mut!(BALANCE).write_volatile(v) }
}

fn main(_mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    rt::println!("demo: balance {}", balance());
    match speculate() {
        Ok(0) => {
            rt::println!("demo: speculate() = 0: assume the transfer of 30 will be approved");
            set_balance(balance() - 30);
            rt::println!("demo:   balance {} (depth {})", balance(), status().depth);
            rt::println!("demo:   the approval is refused: abort()");
            abort();
            return 1;
        }
        Ok(r) => rt::println!(
            "demo: speculate() = {r}: rolled back, balance {} again",
            balance()
        ),
        Err(e) => {
            rt::println!("demo: speculate failed: {e:?}");
            return 1;
        }
    }
    if speculate() == Ok(0) {
        set_balance(balance() - 30);
        rt::println!(
            "demo: second try, balance {}; approved: commit() = {:?}",
            balance(),
            commit()
        );
    }
    match speculate() {
        Ok(0) => {
            set_balance(balance() + 1000);
            rt::println!(
                "demo: speculate() = 0: a deposit of 1000 on the host's word, balance {}",
                balance()
            );
            rt::println!("demo: waiting for the host to decide");
            let mut t = rt::rdtsc();
            loop {
                // Work until the host rolls the VM back (or commits).
                if status().depth == 0 {
                    rt::println!("demo: the host committed, balance {}", balance());
                    return 0;
                }
                let hz = rt::tsc_khz().max(1) * 1000;
                while rt::rdtsc() - t < hz / 2 {
                    core::hint::spin_loop();
                }
                t = rt::rdtsc();
                rt::println!("demo:   still speculating, balance {}", balance());
            }
        }
        Ok(r) => rt::println!(
            "demo: speculate() = {r}: the host aborted, balance {}",
            balance()
        ),
        Err(e) => rt::println!("demo: speculate failed: {e:?}"),
    }
    0
}
