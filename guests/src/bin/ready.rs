//! The boot cache's test guest: "boots" (writes a token and a pattern over
//! `--guest-arg` pages, 16 if 0), says it is ready with the `READY`
//! hypercall, then checks the pattern and prints the token.
//!
//! The token is the TSC at boot, so two real boots print different ones,
//! while a VM restored from the boot cache prints the saved boot's token
//! and never prints the boot line: it starts inside the `READY` call.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::ready;

/// Set at boot; a restored VM finds the saved boot's value.
static mut TOKEN: u64 = 0;

fn pattern(token: u64, i: u64) -> u64 {
    token ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let pages = if arg == 0 { 16 } else { arg };
    if free_base + pages * 4096 > mem_size {
        rt::println!("ready: {pages} pages do not fit");
        return 2;
    }
    let token = rt::rdtsc();
    // SAFETY: one thread; nothing else touches TOKEN.
    unsafe { core::ptr::addr_of_mut!(TOKEN).write_volatile(token) };
    rt::println!("ready: booting, token {token:#x}");
    for i in 0..pages * 512 {
        let p = (free_base + i * 8) as *mut u64;
        // SAFETY: RAM from free_base up is the program's (docs/guest-abi.md),
        // and the range was checked against the RAM size.
        unsafe { p.write_volatile(pattern(token, i)) };
    }
    if let Err(e) = ready() {
        rt::println!("ready: the READY hypercall failed: {e:?}");
        return 3;
    }
    // SAFETY: as above.
    let token = unsafe { core::ptr::addr_of!(TOKEN).read_volatile() };
    for i in 0..pages * 512 {
        // SAFETY: as above.
        let v = unsafe { ((free_base + i * 8) as *const u64).read_volatile() };
        if v != pattern(token, i) {
            rt::println!(
                "ready: word {i} is {v:#x}, expected {:#x}",
                pattern(token, i)
            );
            return 4;
        }
    }
    rt::println!("ready: up, token {token:#x}, {pages} pages intact");
    0
}
