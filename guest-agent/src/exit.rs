//! Ending the VM through the exit device at [`EXIT_PORT`](crate::abi::EXIT_PORT).

use crate::abi::EXIT_PORT;
use crate::pio::outl;

/// Ends the VM; the VMM process exits with `code & 0xff`.
///
/// The VMM stops the vCPU at the `out` itself, so this never returns. Should
/// the write come back (no exit device), the caller spins instead of running
/// on into whatever follows.
pub fn exit(code: u32) -> ! {
    outl(EXIT_PORT, code);
    loop {
        core::hint::spin_loop();
    }
}
