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
pub const UNCLAIMED_MMIO: u64 = 0xd000_0000;
