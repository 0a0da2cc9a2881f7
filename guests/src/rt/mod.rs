//! The runtime every bare guest shares: entry point, exit, panic handler,
//! console output and the memory functions the compiler calls.
//!
//! Each program pulls it in with `#[path = "../rt/mod.rs"] mod rt;` and
//! defines `fn main(mem_size: u64, free_base: u64, arg: u64) -> u32`. Being
//! part of the program's own crate (not a library archive) guarantees that
//! the linker sees `_start` and the memory functions whatever the program
//! happens to reference.
//!
//! The contract with the VMM is in `docs/guest-abi.md`: the vCPU starts at
//! `_start` in 64-bit mode at CPL3 with IOPL 3, RSP = 0x3ffff8, and RDI, RSI,
//! RDX holding the RAM size, the first free address and the `--guest-arg`.

// Not every program uses every helper.
#![allow(dead_code, unused_macros, unused_imports)]

mod mem;
pub mod udp;

use core::fmt::Write;
use guest_agent::serial::Serial;

pub use guest_agent::exit::exit;

/// The status a program ends with when it panics (as Rust's test harness).
pub const PANIC_EXIT_CODE: u32 = 101;

// The entry point. The VMM leaves RSP at 0x3ffff8, which is 8 mod 16, the
// alignment a function sees just after a `call`; re-aligning it to 16 and
// then calling gives `start_rust` the alignment the System V ABI promises.
// RDI, RSI and RDX arrive from the VMM exactly where the ABI puts the first
// three arguments, so they pass straight through. RBP is cleared so that a
// frame-pointer walk ends here.
core::arch::global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {start_rust}",
    "    ud2",
    ".size _start, . - _start",
    start_rust = sym start_rust,
);

/// Runs the program's `main` and ends the VM with its result.
/// The guest TSC frequency in kHz, from RCX at entry (0 if unknown).
static TSC_KHZ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The guest TSC frequency in kHz that the VMM passed at entry (0 if
/// unknown).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(core::sync::atomic::Ordering::Relaxed)
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" fn start_rust(mem_size: u64, free_base: u64, arg: u64, tsc_khz: u64) -> ! {
    TSC_KHZ.store(tsc_khz, core::sync::atomic::Ordering::Relaxed);
    exit(crate::main(mem_size, free_base, arg))
}

/// The console: COM1.
pub fn console() -> Serial {
    Serial::com1()
}

/// Writes formatted text to the console; used by `print!` and `println!`.
pub fn write_fmt(args: core::fmt::Arguments<'_>) {
    // Serial::write_str never fails.
    let _ = console().write_fmt(args);
}

/// Prints to the serial console, like `std::print!`.
macro_rules! print {
    ($($arg:tt)*) => { $crate::rt::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the serial console, like `std::println!`.
macro_rules! println {
    () => { $crate::rt::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => {{
        $crate::rt::write_fmt(format_args!($($arg)*));
        $crate::rt::write_fmt(format_args!("\n"));
    }};
}

pub(crate) use print;
pub(crate) use println;

/// Never called: with `panic = "abort"` nothing unwinds. The precompiled
/// `core` was built for unwinding, though, and its unwind tables still name
/// this symbol, so the link needs a definition.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut out = console();
    let _ = write!(out, "panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(out, " at {}:{}", loc.file(), loc.line());
    }
    let _ = out.write_str("\n");
    exit(PANIC_EXIT_CODE)
}
