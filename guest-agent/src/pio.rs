//! Port I/O primitives. A bare guest runs at CPL3 with IOPL 3; a Linux
//! program must first get access to the ports with `ioperm(2)`.

/// Writes one byte to an I/O port.
#[inline]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory-safety effect on this program; the
    // caller has been granted access by IOPL or ioperm.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags))
    }
    val
}

/// Writes four bytes to an I/O port.
#[inline]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}
