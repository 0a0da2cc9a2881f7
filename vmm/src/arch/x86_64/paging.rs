//! Identity-mapped page tables built by the VMM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// Most GiB one PDPT, with the PDs that follow it, may map here: the
/// largest guest (64 GiB of RAM, `config::MAX_MEM_SIZE`) plus the 1 GiB
/// MMIO gap below 4 GiB that pushes its RAM up. The PDs, one page per GiB
/// from `PD_ADDR`, end at 0x53000, below everything a bare guest uses.
pub const MAX_MAPPED_GIB: u64 = 65;

/// Errors while writing page tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The range to map is larger than the page-table area allows.
    #[error("cannot identity-map {0:#x} bytes: at most {MAX_MAPPED_GIB} GiB")]
    TooLarge(u64),
    /// Guest memory could not be written.
    #[error("writing page tables at {0:#x}: {1}")]
    Write(u64, vm_memory::GuestMemoryError),
}

/// Writes page tables that identity-map `[0, end)` with 2 MiB pages, and
/// returns the value for CR3. With `user`, the pages are reachable from CPL3.
pub fn setup_identity_map<M: GuestMemoryBackend>(
    mem: &M,
    end: u64,
    user: bool,
) -> Result<u64, PagingError> {
    let gib = end.div_ceil(GIB);
    if gib > MAX_MAPPED_GIB {
        return Err(PagingError::TooLarge(end));
    }
    let flags = PRESENT | WRITABLE | if user { USER } else { 0 };
    let write = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| PagingError::Write(addr, e))
    };
    write(PML4_ADDR, PDPT_ADDR | flags)?;
    for g in 0..gib {
        let pd = PD_ADDR + g * 0x1000;
        write(PDPT_ADDR + g * 8, pd | flags)?;
        for i in 0..512 {
            write(pd + i * 8, (g * GIB + i * TWO_MIB) | flags | HUGE)?;
        }
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn maps_every_2mib_page_identically() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = setup_identity_map(&mem, 2 * GIB, true).unwrap();
        assert_eq!(cr3, PML4_ADDR);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        assert_ne!(pml4 & USER, 0);
        let pdpt1: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 8)).unwrap();
        assert_eq!(pdpt1 & !0xfff, PD_ADDR + 0x1000);
        let pde: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 0x1000 + 3 * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, GIB + 3 * TWO_MIB);
        assert_ne!(pde & HUGE, 0);
    }

    #[test]
    fn refuses_too_much() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(setup_identity_map(&mem, 66 * GIB, false).is_err());
    }
}
