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
    /// The program breaks the bare-guest contract (docs/guest-abi.md).
    #[error("bare guest program {0}: {1}")]
    Contract(PathBuf, String),
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
    check_contract(&f, mem_size).map_err(|m| BareError::Contract(program.into(), m))?;
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

/// ELF constants (the ELF-64 object file format).
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;
/// Most program headers read.
const MAX_PHDRS: u16 = 256;

/// Checks what linux-loader's ELF loader leaves to its caller: it loads any
/// class, machine and type, and segments anywhere in guest memory (a kernel
/// loader trusts its kernel). A bare guest must be a static 64-bit x86-64
/// executable (`ET_EXEC`, no interpreter, no dynamic section) whose
/// segments lie in RAM at or above [`BARE_LOAD_ADDR`]; anything else is
/// refused with the reason, before a byte is loaded. The headers are read
/// here by hand because the loader does not expose its parsed ones.
fn check_contract(f: &File, mem_size: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0)
        .map_err(|e| format!("reading the ELF header: {e}"))?;
    if eh[..4] != *b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if eh[4] != ELFCLASS64 || eh[5] != ELFDATA2LSB {
        return Err(
            "not a 64-bit little-endian ELF (32-bit programs cannot be bare guests)".into(),
        );
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (e_type, machine) = (u16_at(&eh, 16), u16_at(&eh, 18));
    if machine != EM_X86_64 {
        return Err(format!("ELF machine {machine}, not x86-64 ({EM_X86_64})"));
    }
    if e_type != ET_EXEC {
        return Err(format!(
            "ELF type {e_type}, not a static executable (ET_EXEC): position-independent \
             and shared objects are not loaded"
        ));
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
    if phnum == 0 || phnum > MAX_PHDRS || usize::from(phentsize) < 56 {
        return Err(format!("{phnum} program headers of {phentsize} bytes"));
    }
    let mut loads = 0;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        let off = phoff
            .checked_add(i * u64::from(phentsize))
            .ok_or("program header offset overflows")?;
        f.read_exact_at(&mut ph, off)
            .map_err(|e| format!("reading program header {i}: {e}"))?;
        let p_type = u32_at(&ph, 0);
        if p_type == PT_INTERP || p_type == PT_DYNAMIC {
            return Err("a dynamically linked program (PT_INTERP or PT_DYNAMIC)".into());
        }
        if p_type != PT_LOAD {
            continue;
        }
        loads += 1;
        let (paddr, filesz, memsz) = (u64_at(&ph, 24), u64_at(&ph, 32), u64_at(&ph, 40));
        if filesz > memsz {
            return Err(format!(
                "segment {i}: file size {filesz:#x} > memory size {memsz:#x}"
            ));
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| format!("segment {i}: {paddr:#x} + {memsz:#x} overflows"))?;
        if paddr < BARE_LOAD_ADDR {
            return Err(format!(
                "segment {i} at {paddr:#x}, below {BARE_LOAD_ADDR:#x} where the VMM's structures are"
            ));
        }
        if end > mem_size.min(crate::arch::x86_64::layout::MMIO_GAP_START) {
            return Err(format!(
                "segment {i} ({paddr:#x}..{end:#x}) is past the guest's low RAM (--memory {mem_size:#x})"
            ));
        }
    }
    if loads == 0 {
        return Err("no loadable segment".into());
    }
    Ok(())
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
