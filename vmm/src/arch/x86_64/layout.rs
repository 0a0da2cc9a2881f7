//! The guest-physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT (bare guests)
//! 0x0000_0600  TSS with an I/O bitmap, ..0x2669 (bare guests)
//! 0x0001_0000  page tables: PML4, PDPT, then one PD per GiB
//! 0x0020_0000  ..0x40_0000: bare guest stack (grows down)
//! 0x0040_0000  bare guest program
//! 0x0100_0000  bare guest free data area
//! 0xc000_0000  ..0x1_0000_0000: MMIO gap (no RAM)
//! 0x1_0000_0000  RAM above the gap, when there is more than 3 GiB
//! ```

/// Guest address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x600;
/// Offset of the I/O permission bitmap in the TSS (just past its 0x68
/// bytes of fixed fields).
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// Size of an I/O permission bitmap covering all 65,536 ports.
pub const IOMAP_SIZE: u64 = 0x2000;
/// The TSS segment limit: fixed fields, the bitmap, and the all-ones byte
/// the CPU requires after it.
pub const TSS_LIMIT: u32 = (TSS_IOMAP_OFFSET + IOMAP_SIZE) as u32;
/// Guest address of the top-level page table.
pub const PML4_ADDR: u64 = 0x1_0000;
/// Guest address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x1_1000;
/// Guest address of the first page directory; one follows per GiB mapped.
pub const PD_ADDR: u64 = 0x1_2000;

/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The RAM ranges `(guest address, size)` for a guest of `mem_size` bytes:
/// RAM fills the space below the MMIO gap, and the rest goes above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The highest guest-physical address (exclusive) a guest of `mem_size`
/// bytes can reach, RAM or MMIO gap, whichever is higher.
pub fn phys_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .last()
        .map_or(0, |&(base, size)| base + size)
        .max(MMIO_GAP_END)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(phys_end(256 << 20), MMIO_GAP_END);
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
        assert_eq!(phys_end(4 << 30), 5 << 30);
    }
}
