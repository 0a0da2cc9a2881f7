//! Bare guests: freestanding 64-bit programs that start at CPL3.
//!
//! A bare guest is a static ELF whose segments load at their physical
//! addresses, at or above [`BARE_LOAD_ADDR`]. The VMM identity-maps guest
//! memory with user-accessible pages, starts the vCPU in 64-bit user mode
//! with IOPL 3, and passes the memory size, the free-memory base and one
//! argument in RDI, RSI and RDX. On a host whose KVM emulates guest kernel
//! code, such a guest runs at native speed. See `docs/guest-abi.md`.

use std::fs::File;
use std::path::{Path, PathBuf};

use guest_agent::abi::{BARE_FREE_BASE, BARE_LOAD_ADDR, BARE_STACK_TOP};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::gdt::gdt_words;
use crate::arch::x86_64::layout::{
    phys_end, GDT_ADDR, IOMAP_SIZE, TSS_ADDR, TSS_IOMAP_OFFSET, TSS_LIMIT,
};
use crate::arch::x86_64::paging::{setup_identity_map, PagingError};
use crate::arch::x86_64::regs::{bare_regs, default_fpu, user_mode_sregs};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::Vcpu;

/// Errors loading or starting a bare guest.
#[derive(Debug, thiserror::Error)]
pub enum BareError {
    /// The program file could not be opened.
    #[error("bare guest program {0}: {1}")]
    Open(PathBuf, std::io::Error),
    /// The program is not a loadable x86-64 ELF, or does not fit.
    #[error(
        "bare guest program {0}: not a loadable x86-64 ELF at {BARE_LOAD_ADDR:#x} or above: {1}"
    )]
    Load(PathBuf, linux_loader::loader::Error),
    /// Page tables could not be built.
    #[error("bare guest page tables: {0}")]
    Paging(#[from] PagingError),
    /// The GDT or TSS could not be written.
    #[error("writing the GDT and TSS at {GDT_ADDR:#x}: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    /// A vCPU register ioctl failed.
    #[error("setting up vCPU {0} for a bare guest: {1}")]
    Vcpu(u8, kvm_ioctls::Error),
}

/// Where a loaded bare guest starts.
#[derive(Debug, Clone, Copy)]
pub struct BareEntry {
    /// Its entry point.
    pub entry: u64,
    /// The value of CR3 for its identity map.
    pub cr3: u64,
}

/// Loads `program` into `mem` and builds the GDT and page tables it needs.
pub fn load(mem: &GuestMemoryMmap, mem_size: u64, program: &Path) -> Result<BareEntry, BareError> {
    let mut f = File::open(program).map_err(|e| BareError::Open(program.into(), e))?;
    let res = Elf::load(mem, None, &mut f, Some(GuestAddress(BARE_LOAD_ADDR)))
        .map_err(|e| BareError::Load(program.into(), e))?;
    for (i, w) in gdt_words(TSS_ADDR, TSS_LIMIT).iter().enumerate() {
        mem.write_obj(*w, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(BareError::Gdt)?;
    }
    write_tss(mem)?;
    let cr3 = setup_identity_map(mem, phys_end(mem_size), true)?;
    Ok(BareEntry {
        entry: res.kernel_load.0,
        cr3,
    })
}

/// Writes the TSS with an I/O permission bitmap that allows every port.
///
/// IOPL 3 in RFLAGS already allows port I/O at CPL3 on VMX/SVM hosts, but
/// `kvm_pvm` ignores the guest's IOPL in user mode (measured: RFLAGS reads
/// back with IOPL 0 and the first `in` raises #GP). The TSS bitmap is the
/// other architectural way to grant the ports, and it works on both.
fn write_tss(mem: &GuestMemoryMmap) -> Result<(), BareError> {
    let w = |off: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(TSS_ADDR + off))
            .map_err(BareError::Gdt)
    };
    // The fixed part and the bitmap: zero bits allow a port.
    w(0, &vec![0u8; (TSS_IOMAP_OFFSET + IOMAP_SIZE) as usize])?;
    w(0x66, &(TSS_IOMAP_OFFSET as u16).to_le_bytes())?;
    // The byte after the bitmap must have all bits set.
    w(TSS_IOMAP_OFFSET + IOMAP_SIZE, &[0xff])
}

/// Puts `vcpu` at the bare guest's entry, in 64-bit user mode.
pub fn setup_vcpu(vcpu: &Vcpu, e: BareEntry, mem_size: u64, arg: u64) -> Result<(), BareError> {
    let err = |x| BareError::Vcpu(vcpu.index, x);
    let sregs = vcpu.fd.get_sregs().map_err(err)?;
    vcpu.fd
        .set_sregs(&user_mode_sregs(&sregs, e.cr3))
        .map_err(err)?;
    vcpu.fd.set_fpu(&default_fpu()).map_err(err)?;
    // The TSC frequency lets a guest turn `rdtsc` into time; 0 if unknown.
    let tsc_khz = vcpu.fd.get_tsc_khz().unwrap_or(0);
    let regs = bare_regs(
        e.entry,
        BARE_STACK_TOP,
        [mem_size, BARE_FREE_BASE, arg, u64::from(tsc_khz)],
    );
    vcpu.fd.set_regs(&regs).map_err(err)
}
