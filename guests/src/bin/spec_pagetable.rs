//! A rollback must also roll back the guest's address translation.
//!
//! The guest rewrites an entry of its own page directory during a
//! speculation, so that a virtual 2 MiB window maps another frame, reads
//! through the window, and aborts. After the rollback the directory entry
//! is the checkpoint's again, and the window must read the checkpoint's
//! frame. On a KVM that shadows guest page tables (no EPT/NPT), this fails
//! unless the VMM makes KVM drop its shadow pages on rollback
//! (`vmm/src/host_compat/shadow.rs`): the shadow of the speculative entry
//! would outlive the entry.
//!
//! Needs 128 MiB of guest memory. Exit status 0 on success; the failing
//! check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{abort, speculate};

/// The page directory of the first GiB, as the VMM builds it for bare
/// guests (`vmm/src/arch/x86_64/layout.rs`, `PD_ADDR`), mapped writable
/// at CPL3 by the identity map.
const PD: u64 = 0x1_2000;
const TWO_MIB: u64 = 2 << 20;
/// Present, writable, user, 2 MiB page.
const FLAGS: u64 = 0x87;
const ACCESSED_DIRTY: u64 = 0x60;
/// Frames A and B, and the window, as 2 MiB page numbers.
const FRAME_A: u64 = 30;
const FRAME_B: u64 = 31;
const WINDOW: u64 = 40;
const MARK_A: u64 = 0xaaaa_0000_0000_aaaa;
const MARK_B: u64 = 0xbbbb_0000_0000_bbbb;

fn pde(i: u64) -> *mut u64 {
    (PD + i * 8) as *mut u64
}

fn window() -> u64 {
    // SAFETY: the window's directory entry always maps frame A or B.
    unsafe { ((WINDOW * TWO_MIB) as *const u64).read_volatile() }
}

fn main(mem_size: u64, _free_base: u64, _arg: u64) -> u32 {
    if mem_size < (WINDOW + 1) * TWO_MIB {
        rt::println!("spec_pagetable: needs 128 MiB of memory");
        return 2;
    }
    // SAFETY: frames A and B lie in free RAM above the program, and the
    // directory is the guest's own (identity-mapped, writable).
    unsafe {
        ((FRAME_A * TWO_MIB) as *mut u64).write_volatile(MARK_A);
        ((FRAME_B * TWO_MIB) as *mut u64).write_volatile(MARK_B);
        // The window has not been touched yet, so no translation of it is
        // cached anywhere.
        pde(WINDOW).write_volatile((FRAME_A * TWO_MIB) | FLAGS);
    }
    if window() != MARK_A {
        rt::println!("spec_pagetable: the window does not map frame A");
        return 3;
    }
    match speculate() {
        Ok(0) => {
            // SAFETY: as above.
            unsafe { pde(WINDOW).write_volatile((FRAME_B * TWO_MIB) | FLAGS) };
            // Read through the new entry, so its translation is built.
            let seen = window();
            rt::println!("spec_pagetable: speculating, the window reads {seen:#x}");
            let e = abort();
            rt::println!("spec_pagetable: abort returned {e:?}");
            return 4;
        }
        Ok(_) => {}
        Err(e) => {
            rt::println!("spec_pagetable: speculate failed: {e:?}");
            return 5;
        }
    }
    // SAFETY: as above.
    // The processor (or KVM's walker) sets the accessed and dirty bits.
    let entry = unsafe { pde(WINDOW).read_volatile() } & !ACCESSED_DIRTY;
    if entry != (FRAME_A * TWO_MIB) | FLAGS {
        rt::println!("spec_pagetable: directory entry not restored: {entry:#x}");
        return 6;
    }
    let seen = window();
    if seen != MARK_A {
        rt::println!(
            "spec_pagetable: stale translation after rollback: the window reads {seen:#x}"
        );
        return 7;
    }
    rt::println!("spec_pagetable: translation rolled back, ok");
    0
}
