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
//!
//! A Linux guest shares the GDT, TSS and page-table addresses above, and
//! adds (all below 1 MiB, which no Linux allocation uses early):
//!
//! ```text
//! 0x0000_7000  boot parameters (the "zero page")
//! 0x0000_8ff0  boot stack top
//! 0x0002_0000  kernel command line
//! 0x0009_a000  ..0x9_f000: pages reserved for the host-compat layer
//! 0x0009_f000  ..0x10_0000: reserved (EBDA, VGA, BIOS); ACPI tables at 0xe_0000
//! 0x0100_0000  the kernel (vmlinux's physical load address)
//! 0xc000_0000  first page of the MMIO gap: host-compat doorbell
//! 0xc000_1000  ..0xc000_3000: host-compat shadow-reset page, at one of two places
//! 0xd000_0000  virtio-mmio devices, one 4 KiB window each (devices::virtio)
//! 0xdf00_0000  left unclaimed (guest_agent::abi::UNCLAIMED_MMIO)
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

/// Guest address of the Linux boot parameters (zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of a Linux boot CPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Guest address of the Linux command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Most bytes of command line, with its NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Pages kept out of the e820 RAM map for the host-compat layer.
pub const COMPAT_PAGES_ADDR: u64 = 0x9_a000;
/// Start of the reserved area below 1 MiB (EBDA, VGA, BIOS).
pub const LOW_RESERVED_START: u64 = 0x9_f000;
/// Guest address of the ACPI tables (RSDP first): in the BIOS area, where
/// an OS also looks for the RSDP.
pub const ACPI_TABLES_ADDR: u64 = 0xe_0000;
/// Start of "high" memory, where the kernel and initrd go.
pub const HIMEM_START: u64 = 0x10_0000;
/// A guest-physical page with no RAM, for the host-compat doorbell.
pub const COMPAT_DOORBELL_ADDR: u64 = MMIO_GAP_START;
/// A page of the MMIO gap that the host-compat layer registers as a memory
/// slot of its own, only to delete it after a rollback
/// (`host_compat::shadow`). No device and no RAM is there.
pub const SHADOW_RESET_ADDR: u64 = MMIO_GAP_START + 0x1000;
/// The page that slot moves to and back from, one move per rollback
/// (`host_compat::shadow`). No device and no RAM is there either.
pub const SHADOW_RESET_ALT_ADDR: u64 = MMIO_GAP_START + 0x2000;
/// Guest address of the I/O APIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Guest address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

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
