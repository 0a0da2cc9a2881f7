//! The speculation hypercalls, as a guest program calls them.
//!
//! Works the same in a bare guest (CPL3, ports granted by the VMM) and in
//! a Linux program that has called `ioperm(HYPERCALL_PORT, 4, 1)`.

use crate::abi::{err, op, HYPERCALL_PORT};

/// The three result registers of a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    /// RAX: the main result.
    pub rax: u64,
    /// RDX: a second result, for some operations.
    pub rdx: u64,
    /// RSI: a third result, for some operations.
    pub rsi: u64,
}

/// Issues hypercall `op` with argument `arg`, returning the result registers.
#[inline(never)]
pub fn raw(op: u32, arg: u64) -> Regs {
    let (rax, rdx, rsi): (u64, u64, u64);
    // SAFETY: the `out` traps to the VMM, which sets RAX, RDX and RSI and
    // resumes after the instruction; no memory is touched. On a rollback
    // the VMM restores a complete earlier register state, whose RIP is just
    // after a `speculate` `out` like this one; the compiler's view of the
    // other registers holds there too, since it is this same instruction.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("rax") u64::from(op),
            in("rdx") u64::from(HYPERCALL_PORT),
            in("rdi") arg,
            lateout("rax") rax,
            lateout("rdx") rdx,
            lateout("rsi") rsi,
            options(nostack),
        );
    }
    Regs { rax, rdx, rsi }
}

/// A hypercall error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The VM holds no speculation of its own.
    NoSpeculation,
    /// The VMM did not know the operation.
    BadOp,
    /// A bad argument.
    BadArg,
    /// The checkpoint stack is full.
    TooDeep,
    /// The VMM failed to take or restore a checkpoint.
    Internal,
    /// The checkpoints hold as much memory as the VMM allows.
    NoBudget,
    /// A result this library does not know.
    Unknown(u64),
}

impl Error {
    fn from_raw(v: u64) -> Self {
        match v {
            err::NO_SPECULATION => Self::NoSpeculation,
            err::BAD_OP => Self::BadOp,
            err::BAD_ARG => Self::BadArg,
            err::TOO_DEEP => Self::TooDeep,
            err::INTERNAL => Self::Internal,
            err::NO_BUDGET => Self::NoBudget,
            v => Self::Unknown(v),
        }
    }

    /// The error's raw value, as the VMM returned it.
    pub fn raw(self) -> u64 {
        match self {
            Self::NoSpeculation => err::NO_SPECULATION,
            Self::BadOp => err::BAD_OP,
            Self::BadArg => err::BAD_ARG,
            Self::TooDeep => err::TOO_DEEP,
            Self::Internal => err::INTERNAL,
            Self::NoBudget => err::NO_BUDGET,
            Self::Unknown(v) => v,
        }
    }
}

fn is_err(v: u64) -> bool {
    (v as i64) < 0
}

/// Takes a checkpoint of the whole VM. Returns `Ok(0)` now, and
/// `Ok(reason)` (non-zero, see [`crate::abi::reason`]) when the VM has been
/// rolled back to this checkpoint.
pub fn speculate() -> Result<u64, Error> {
    let r = raw(op::SPECULATE, 0).rax;
    if is_err(r) {
        Err(Error::from_raw(r))
    } else {
        Ok(r)
    }
}

/// Tells the VMM that the guest is booted and ready for work
/// ([`op::READY`]): with a boot cache, the VMM saves the VM at this call.
pub fn ready() -> Result<(), Error> {
    match raw(op::READY, 0).rax {
        0 => Ok(()),
        e => Err(Error::from_raw(e)),
    }
}

/// Commits the innermost speculation of this VM.
pub fn commit() -> Result<(), Error> {
    match raw(op::COMMIT, 0).rax {
        0 => Ok(()),
        r => Err(Error::from_raw(r)),
    }
}

/// Aborts the innermost speculation of this VM. Returns only on failure
/// (most often: there is nothing to abort).
pub fn abort() -> Error {
    Error::from_raw(raw(op::ABORT, 0).rax)
}

/// The VM's speculation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Checkpoints on the stack.
    pub depth: u64,
    /// Ids in the dependency set.
    pub deps: u64,
    /// The VM's own (explicit) speculations among them.
    pub own: u64,
}

/// Reads the speculation status.
pub fn status() -> Status {
    let r = raw(op::STATUS, 0);
    Status {
        depth: r.rax,
        deps: r.rdx,
        own: r.rsi,
    }
}

/// The `i`-th id of the dependency set (bottom first) and whether it is
/// the VM's own.
pub fn entry(i: u64) -> Result<(u64, bool), Error> {
    let r = raw(op::ENTRY, i);
    if is_err(r.rax) {
        Err(Error::from_raw(r.rax))
    } else {
        Ok((r.rax, r.rdx == 1))
    }
}
