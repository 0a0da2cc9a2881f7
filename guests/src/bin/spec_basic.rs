//! The basic speculation contract: `speculate()` returns 0, the guest
//! scribbles over memory and registers, `abort()` rolls the whole VM back,
//! and `speculate()` returns non-zero with memory restored page by page.
//!
//! N pages (`--guest-arg`, 256 when zero) are checked. Exit status 0 on
//! success; the failing check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{abort, commit, speculate, status, Error};

const PAGE: u64 = 4096;

fn fill(base: u64, pages: u64, seed: u64) {
    for p in 0..pages {
        for w in 0..PAGE / 8 {
            // SAFETY: the caller keeps base..base+pages*PAGE inside free RAM.
            unsafe { ((base + p * PAGE + w * 8) as *mut u64).write_volatile(seed ^ (p << 20) ^ w) };
        }
    }
}

/// The first page whose content differs from `fill(base, pages, seed)`.
fn first_bad(base: u64, pages: u64, seed: u64) -> Option<u64> {
    (0..pages).find(|&p| {
        (0..PAGE / 8).any(|w| {
            // SAFETY: as in `fill`.
            let v = unsafe { ((base + p * PAGE + w * 8) as *const u64).read_volatile() };
            v != seed ^ (p << 20) ^ w
        })
    })
}

/// Runs `speculate` with callee-saved registers and an SSE register set to
/// known values, clobbering them on the first return; returns the reason
/// and whether the registers came back intact on the second.
fn speculate_checking_regs() -> (u64, bool) {
    let reason: u64;
    let ok: u64;
    // SAFETY: the block saves and restores every callee-saved register it
    // uses on the stack, and uses the hypercall port as the ABI says. On the
    // first return (RAX = 0) it clobbers the registers and aborts, which
    // never returns; the rollback resumes after the first `out` with the
    // stack and registers of that moment.
    unsafe {
        core::arch::asm!(
            "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
            "mov rbx, 0x1111111111111111",
            "mov rbp, 0x2222222222222222",
            "mov r12, 0x3333333333333333",
            "mov r13, 0x4444444444444444",
            "mov r14, 0x5555555555555555",
            "mov r15, 0x6666666666666666",
            "movq xmm7, r15",
            "mov eax, 1",          // SPECULATE
            "mov dx, 0x5e0",
            "out dx, eax",
            "test rax, rax",
            "jnz 2f",
            // First return: clobber, then abort (op 3).
            "xor ebx, ebx", "xor ebp, ebp", "xor r12d, r12d", "xor r13d, r13d",
            "xor r14d, r14d", "xor r15d, r15d", "pxor xmm7, xmm7",
            "mov eax, 3",
            "mov dx, 0x5e0",
            "out dx, eax",
            "ud2",                 // abort returned: no speculation?
            "2:",
            "mov rcx, 1",
            "mov rdi, 0x1111111111111111", "cmp rbx, rdi", "jne 3f",
            "mov rdi, 0x2222222222222222", "cmp rbp, rdi", "jne 3f",
            "mov rdi, 0x3333333333333333", "cmp r12, rdi", "jne 3f",
            "mov rdi, 0x4444444444444444", "cmp r13, rdi", "jne 3f",
            "mov rdi, 0x5555555555555555", "cmp r14, rdi", "jne 3f",
            "mov rdi, 0x6666666666666666", "cmp r15, rdi", "jne 3f",
            "movq rdi, xmm7", "cmp r15, rdi", "jne 3f",
            "jmp 4f",
            "3:",
            "xor ecx, ecx",
            "4:",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
            out("rax") reason, out("rcx") ok, out("rdx") _, out("rsi") _, out("rdi") _,
            out("xmm7") _,
        );
    }
    (reason, ok == 1)
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let pages = if arg == 0 { 256 } else { arg };
    if free_base + pages * PAGE > mem_size {
        rt::println!("spec_basic: {pages} pages do not fit");
        return 2;
    }
    if commit() != Err(Error::NoSpeculation) || abort() != Error::NoSpeculation {
        rt::println!("spec_basic: commit/abort without a speculation must fail");
        return 3;
    }
    fill(free_base, pages, 0xa);
    let mut counter: u64 = 0;
    let cp = &mut counter as *mut u64;
    match speculate() {
        Ok(0) => {
            if status().depth != 1 {
                return 4;
            }
            fill(free_base, pages, 0xb);
            // SAFETY: `cp` points at a live local.
            unsafe { cp.write_volatile(99) };
            let e = abort();
            rt::println!("spec_basic: abort returned {e:?}");
            return 5;
        }
        Ok(reason) => rt::println!("spec_basic: rolled back, reason {reason}"),
        Err(e) => {
            rt::println!("spec_basic: speculate failed: {e:?}");
            return 6;
        }
    }
    // SAFETY: as above.
    if unsafe { cp.read_volatile() } != 0 {
        rt::println!("spec_basic: stack variable not restored");
        return 7;
    }
    if let Some(p) = first_bad(free_base, pages, 0xa) {
        rt::println!("spec_basic: page {p} not restored");
        return 8;
    }
    if status().depth != 0 {
        return 9;
    }
    let (reason, regs_ok) = speculate_checking_regs();
    if reason == 0 || !regs_ok {
        rt::println!("spec_basic: registers not restored (reason {reason})");
        return 10;
    }
    rt::println!("spec_basic: {pages} pages and registers restored, ok");
    0
}
