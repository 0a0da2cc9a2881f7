//! The Linux side: access to the hypercall port from a user program, and
//! the C ABI (`include/specvm.h`).
//!
//! A Linux program reaches the port with `ioperm(2)`, which needs root
//! (CAP_SYS_RAWIO). The kernel grants it through the TSS I/O bitmap, which
//! works on hosts whose KVM ignores IOPL for guest user mode.

use std::io;

use crate::abi::{HYPERCALL_PORT, HYPERCALL_PORT_LEN};
use crate::hypercall;

/// Asks the kernel for access to the hypercall port.
pub fn open() -> io::Result<()> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    let r = unsafe { libc::ioperm(HYPERCALL_PORT.into(), HYPERCALL_PORT_LEN.into(), 1) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// C: `int specvm_open(void)`: 0, or -errno.
#[no_mangle]
pub extern "C" fn specvm_open() -> i32 {
    match open() {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn to_c<T>(r: Result<T, hypercall::Error>, ok: impl FnOnce(T) -> i64) -> i64 {
    match r {
        Ok(v) => ok(v),
        Err(e) => e.raw() as i64,
    }
}

/// C: `long specvm_speculate(void)`: 0 now, the abort reason (> 0) after
/// a rollback, or a negative error.
#[no_mangle]
pub extern "C" fn specvm_speculate() -> i64 {
    to_c(hypercall::speculate(), |v| v as i64)
}

/// C: `long specvm_commit(void)`: 0, or a negative error.
#[no_mangle]
pub extern "C" fn specvm_commit() -> i64 {
    to_c(hypercall::commit(), |_| 0)
}

/// C: `long specvm_abort(void)`: returns only with a negative error.
#[no_mangle]
pub extern "C" fn specvm_abort() -> i64 {
    hypercall::abort().raw() as i64
}

/// C: `long specvm_depth(void)`: the number of checkpoints held.
#[no_mangle]
pub extern "C" fn specvm_depth() -> i64 {
    hypercall::status().depth as i64
}
