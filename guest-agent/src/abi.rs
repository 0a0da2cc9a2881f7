//! The guest/VMM ABI: fixed I/O ports and the bare-guest entry contract.
//!
//! See `docs/guest-abi.md` for the prose version of this file.

/// COM1, a standard 8250 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of ports the 8250 decodes.
pub const SERIAL_PORT_LEN: u16 = 8;

/// The exit device: a write of 1, 2 or 4 bytes ends the VMM, which exits
/// with the low 8 bits of the written value as its process status.
pub const EXIT_PORT: u16 = 0x501;
/// Number of ports the exit device decodes.
pub const EXIT_PORT_LEN: u16 = 4;

/// Where a bare guest's ELF segments are expected to start.
pub const BARE_LOAD_ADDR: u64 = 0x40_0000;
/// The initial stack pointer of a bare guest (the stack grows down from here).
pub const BARE_STACK_TOP: u64 = 0x3f_fff8;
/// The first guest-physical address a bare guest may use freely as data.
pub const BARE_FREE_BASE: u64 = 0x100_0000;

/// An address in the MMIO gap below 4 GiB where no device answers: reads
/// return all ones and writes are dropped. Tests use it to reach the
/// VMM's MMIO path with no device behind it.
pub const UNCLAIMED_MMIO: u64 = 0xdf00_0000;

/// The hypercall port. A guest writes the operation number with
/// `out dx, eax` (4 bytes); the argument goes in RDI. The VMM puts the
/// result in RAX (and, for some operations, RDX and RSI) before the guest
/// runs on. Linux programs need `ioperm` on this port (root).
pub const HYPERCALL_PORT: u16 = 0x5e0;
/// Number of ports the hypercall device decodes.
pub const HYPERCALL_PORT_LEN: u16 = 4;

/// Hypercall operation numbers (EAX).
pub mod op {
    /// Push an explicit checkpoint. RAX = 0 now; after a rollback to this
    /// checkpoint the same call returns again with a non-zero reason.
    pub const SPECULATE: u32 = 1;
    /// Commit the innermost own speculation. RAX = 0, or an error.
    pub const COMMIT: u32 = 2;
    /// Abort the innermost own speculation: does not return if there is
    /// one; RAX = an error otherwise.
    pub const ABORT: u32 = 3;
    /// RAX = stack depth (checkpoints), RDX = number of ids in the
    /// dependency set, RSI = number of the VM's own (explicit) entries.
    pub const STATUS: u32 = 4;
    /// RDI = index into the dependency set, bottom first. RAX = that id
    /// (VM id << 32 | sequence), RDX = 1 if explicit, 0 if joined; or
    /// RAX = [`super::err::BAD_ARG`] past the end.
    pub const ENTRY: u32 = 5;
    /// The guest has booted and is ready for work (its init says so once,
    /// at the point a restored copy should start from). RAX = 0. A VMM
    /// started with a boot cache saves the whole VM here the first time, so
    /// later starts of the same image restore this moment instead of
    /// booting; a restored copy returns from this same call. Elsewhere it
    /// does nothing.
    pub const READY: u32 = 6;
}

/// Why `speculate()` returned a second time.
pub mod reason {
    /// The guest itself called `abort()`.
    pub const ABORTED_BY_GUEST: u64 = 1;
    /// The host aborted it through the VMM's control API, or the bridge
    /// aborted it (its owner's lease lapsed).
    pub const ABORTED_BY_HOST: u64 = 2;
    /// The speculation never began: the bridge could not record its start
    /// (a shared registry such as etcd was unreachable, or the id is open
    /// elsewhere). Nothing it did was kept; try again later or take the
    /// other path.
    pub const REFUSED: u64 = 3;
}

/// Error results, as negative numbers in RAX.
pub mod err {
    /// `commit`/`abort` with no speculation of the VM's own.
    pub const NO_SPECULATION: u64 = -1i64 as u64;
    /// Unknown operation.
    pub const BAD_OP: u64 = -2i64 as u64;
    /// Bad argument.
    pub const BAD_ARG: u64 = -3i64 as u64;
    /// The checkpoint stack is full.
    pub const TOO_DEEP: u64 = -4i64 as u64;
    /// The VMM failed to take or restore a checkpoint.
    pub const INTERNAL: u64 = -5i64 as u64;
    /// The checkpoints already hold as much memory as the VMM allows this
    /// VM (`specvm run --checkpoint-budget`): commit or abort first.
    pub const NO_BUDGET: u64 = -6i64 as u64;
}
