//! A polling writer (and reader) for the 8250 UART at [`SERIAL_PORT`](crate::abi::SERIAL_PORT).
//!
//! It needs no interrupts and no buffer, so it works in a bare guest before
//! anything else is set up. Each byte costs two port accesses (one `in` of
//! the line status register, one `out` to the transmit holding register),
//! hence two exits to the VMM: fine for test output, too slow for bulk data.

use crate::abi::SERIAL_PORT;
use crate::pio::{inb, outb};

/// Offset of the line status register from the UART's base port.
const LSR_OFFSET: u16 = 5;
/// LSR bit 0: data ready, a received byte waits in the receive buffer.
const LSR_DR: u8 = 1;
/// LSR bit 5: the transmit holding register is empty.
const LSR_THRE: u8 = 1 << 5;
/// How many times to poll the LSR before writing anyway. A VMM that never
/// reports THRE would otherwise hang the guest; losing a byte is the lesser
/// failure, and a correct VMM reports THRE at once.
const THRE_POLL_LIMIT: u32 = 1 << 16;

/// A UART at one base port; implements [`core::fmt::Write`].
#[derive(Debug, Clone, Copy)]
pub struct Serial {
    base: u16,
}

impl Serial {
    /// The UART at `base` (the port of its transmit holding register).
    pub const fn new(base: u16) -> Self {
        Self { base }
    }

    /// COM1, the console of every specvm guest.
    pub const fn com1() -> Self {
        Self::new(SERIAL_PORT)
    }

    /// Writes one byte once the transmitter is ready.
    pub fn write_byte(&self, byte: u8) {
        for _ in 0..THRE_POLL_LIMIT {
            if inb(self.base + LSR_OFFSET) & LSR_THRE != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        outb(self.base, byte);
    }

    /// The next received byte, if one is waiting (LSR data ready); reads
    /// it from the receive buffer register. Assumes DLAB is clear, as it is
    /// unless the program set it.
    pub fn try_read_byte(&self) -> Option<u8> {
        match inb(self.base + LSR_OFFSET) & LSR_DR {
            0 => None,
            _ => Some(inb(self.base)),
        }
    }

    /// Waits, polling LSR, until a byte arrives, and returns it. Never
    /// returns if no input ever comes.
    pub fn read_byte(&self) -> u8 {
        loop {
            if let Some(b) = self.try_read_byte() {
                return b;
            }
            core::hint::spin_loop();
        }
    }

    /// Writes every byte of `bytes`, in order.
    pub fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
