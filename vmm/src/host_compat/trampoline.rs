//! The system-call trampoline: makes `syscall` from guest user mode work on
//! a host whose KVM gets it wrong.
//!
//! How it was found (HOST-KVM.md, "System calls from guest user mode are
//! broken here"): on `kvm_pvm`, a `syscall` at CPL3 jumps to the guest's
//! LSTAR but leaves CS at the user selector (0x33). Linux's entry code then
//! faults, and the first user process dies with SIGSEGV ("init[1]: segfault
//! at ffffffff81c00080 ... RIP: 0033:entry_SYSCALL_64"). `int 0x80` raises
//! #UD there, so there is no other way in.
//!
//! The fix:
//! 1. Four reserved guest pages ([`COMPAT_PAGES_ADDR`], kept out of the
//!    e820 RAM map) hold a PUD, a PMD and a page table that map, at
//!    [`TRAMPOLINE_VA`] in PGD slot 401 (a hole Linux never uses with
//!    `nokaslr`), a user-executable code page, and after it a user-writable
//!    page at a guest-physical address without RAM (the doorbell).
//! 2. The code page holds one instruction: a store to the doorbell.
//! 3. An MSR filter makes the guest's writes of STAR, LSTAR, CSTAR and
//!    SFMASK exit to the VMM. The VMM performs them, except that on a write
//!    of LSTAR it remembers the kernel's entry point, writes the slot-401
//!    entry into the top page table of the current CR3 (the kernel's
//!    `init_top_pgt`, whose kernel half every process copies), and points
//!    LSTAR at the trampoline instead. This happens on every CPU as it
//!    comes up.
//! 4. A user `syscall` lands in the trampoline, still at CPL3, with RCX and
//!    R11 set as `syscall` sets them. Its store exits to the VMM as MMIO.
//! 5. The VMM finishes what the CPU should have done: CS and SS from STAR's
//!    kernel selectors, RFLAGS masked by SFMASK, RIP at the kernel's entry.
//! 6. `sysretq` back to user mode is emulated correctly by the host.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{kvm_enable_cap, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::gdt::flat_segments;
use crate::arch::x86_64::layout::{COMPAT_DOORBELL_ADDR, COMPAT_PAGES_ADDR};
use crate::devices::{BusDevice, VcpuTrap};
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};
use crate::vstate::memory::GuestMemoryMmap;

/// MSR_STAR: the kernel and user segment selectors of `syscall`/`sysret`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// MSR_LSTAR: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// MSR_CSTAR: the compatibility-mode entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// MSR_SYSCALL_MASK (SFMASK): RFLAGS bits `syscall` clears.
pub const MSR_SFMASK: u32 = 0xc000_0084;
/// Where the trampoline's code page is mapped in every address space.
pub const TRAMPOLINE_VA: u64 = 0xffff_c880_0000_0000;
/// Where the doorbell page is mapped: right after the code.
pub const DOORBELL_VA: u64 = TRAMPOLINE_VA + PAGE;
/// The PGD slot of [`TRAMPOLINE_VA`].
pub const PGD_SLOT: u64 = (TRAMPOLINE_VA >> 39) & 0x1ff;
/// Number of guest pages the trampoline uses at [`COMPAT_PAGES_ADDR`].
pub const PAGES: u64 = 4;

const PAGE: u64 = 0x1000;
const PUD_ADDR: u64 = COMPAT_PAGES_ADDR;
const PMD_ADDR: u64 = COMPAT_PAGES_ADDR + PAGE;
const PT_ADDR: u64 = COMPAT_PAGES_ADDR + 2 * PAGE;
const CODE_ADDR: u64 = COMPAT_PAGES_ADDR + 3 * PAGE;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const NO_CACHE: u64 = 1 << 4;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// Flags of a table entry; Linux's `pgd_bad()` wants A and D set too.
const TABLE: u64 = PRESENT | WRITABLE | USER | ACCESSED | DIRTY;
/// Physical-address bits of CR3 and of page-table entries.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// RFLAGS.RF, which `syscall` clears.
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS bit 1, always set.
const RFLAGS_FIXED: u64 = 1 << 1;
/// KVM_MSR_EXIT_REASON_FILTER: exit to userspace on filtered MSRs only.
const MSR_EXIT_REASON_FILTER: u64 = 1 << 2;

/// Errors of the trampoline.
#[derive(Debug, thiserror::Error)]
pub enum TrampolineError {
    /// A KVM ioctl failed.
    #[error("system-call trampoline: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be read or written.
    #[error("system-call trampoline: guest memory at {0:#x}: {1}")]
    Memory(u64, vm_memory::GuestMemoryError),
    /// The kernel already uses PGD slot 401.
    #[error("system-call trampoline: PGD slot {PGD_SLOT} of CR3 {cr3:#x} is in use ({entry:#x}); is the kernel booted with nokaslr?")]
    SlotInUse {
        /// The CR3 at the time.
        cr3: u64,
        /// The entry found there.
        entry: u64,
    },
    /// With 5-level paging, the top table has no entry for the kernel half.
    #[error("system-call trampoline: CR3 {0:#x} (5-level paging) maps no kernel half")]
    NoKernelHalf(u64),
    /// The doorbell rang before the kernel set LSTAR.
    #[error("system-call trampoline reached before the kernel set LSTAR (rip {0:#x})")]
    NoKernelEntry(u64),
}

/// The trampoline's shared state: the MSR values the kernel wrote.
#[derive(Debug, Default)]
pub struct Trampoline {
    kernel_lstar: AtomicU64,
    star: AtomicU64,
    sfmask: AtomicU64,
}

/// The trampoline's state, as a snapshot saves it: the values the guest
/// kernel wrote to LSTAR, STAR and SFMASK. KVM's own LSTAR holds
/// [`TRAMPOLINE_VA`], so the kernel's entry point exists only here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrampolineState {
    /// The kernel's 64-bit system-call entry point; 0 until it sets LSTAR.
    pub kernel_lstar: u64,
    /// The kernel's STAR.
    pub star: u64,
    /// The kernel's SFMASK.
    pub sfmask: u64,
}

impl TrampolineState {
    /// Whether the kernel has set LSTAR, so that the guest's LSTAR points
    /// at the trampoline.
    pub fn installed(&self) -> bool {
        self.kernel_lstar != 0
    }
}

impl Encode for TrampolineState {
    /// The kernel's LSTAR, STAR and SFMASK.
    fn encode(&self, w: &mut Writer) {
        w.u64(self.kernel_lstar);
        w.u64(self.star);
        w.u64(self.sfmask);
    }
}

impl Decode for TrampolineState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            kernel_lstar: r.u64("trampoline kernel LSTAR")?,
            star: r.u64("trampoline STAR")?,
            sfmask: r.u64("trampoline SFMASK")?,
        })
    }
}

/// The instruction in the code page: `movabs %al, DOORBELL_VA` (a2 + the
/// 64-bit address), then `ud2` should anything ever run past it.
pub fn code() -> Vec<u8> {
    let mut c = vec![0xa2];
    c.extend_from_slice(&DOORBELL_VA.to_le_bytes());
    c.extend_from_slice(&[0x0f, 0x0b]);
    c
}

/// The PGD entry that maps the trampoline.
pub fn pgd_entry() -> u64 {
    PUD_ADDR | TABLE
}

/// Writes the trampoline's page tables and code into the reserved pages.
pub fn write_pages(mem: &GuestMemoryMmap) -> Result<(), TrampolineError> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| TrampolineError::Memory(addr, e))
    };
    let idx = |va: u64, shift: u32| (va >> shift) & 0x1ff;
    w(PUD_ADDR + 8 * idx(TRAMPOLINE_VA, 30), PMD_ADDR | TABLE)?;
    w(PMD_ADDR + 8 * idx(TRAMPOLINE_VA, 21), PT_ADDR | TABLE)?;
    w(
        PT_ADDR + 8 * idx(TRAMPOLINE_VA, 12),
        CODE_ADDR | PRESENT | USER | ACCESSED,
    )?;
    w(
        PT_ADDR + 8 * idx(DOORBELL_VA, 12),
        COMPAT_DOORBELL_ADDR | PRESENT | WRITABLE | USER | NO_CACHE | ACCESSED | DIRTY,
    )?;
    mem.write_slice(&code(), GuestAddress(CODE_ADDR))
        .map_err(|e| TrampolineError::Memory(CODE_ADDR, e))
}

/// Makes the guest's writes of STAR, LSTAR, CSTAR and SFMASK exit to the
/// VMM (KVM_CAP_X86_USER_SPACE_MSR with a filter); every other MSR access
/// stays inside KVM.
pub fn install_msr_filter(vm: &VmFd) -> Result<(), TrampolineError> {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [MSR_EXIT_REASON_FILTER, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| TrampolineError::Kvm("KVM_CAP_X86_USER_SPACE_MSR", e))?;
    // A zero bit denies the write, which is what makes it exit.
    let bitmap = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::WRITE,
        base: MSR_STAR,
        msr_count: 4,
        bitmap: &bitmap,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(|e| TrampolineError::Kvm("KVM_X86_SET_MSR_FILTER", e))
}

/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;

/// The guest-physical address of the trampoline's entry in the table that
/// translates bits 39..47 of [`TRAMPOLINE_VA`]: the CR3 table itself with
/// 4-level paging, or the one its top entry points to with 5-level paging
/// (Linux uses it when the CPU has LA57; every process shares that table).
pub fn slot_address(
    cr3: u64,
    cr4: u64,
    read: impl Fn(u64) -> Result<u64, TrampolineError>,
) -> Result<u64, TrampolineError> {
    let mut table = cr3 & ADDR_MASK;
    if cr4 & CR4_LA57 != 0 {
        let top = table + 8 * ((TRAMPOLINE_VA >> 48) & 0x1ff);
        let entry = read(top)?;
        if entry & PRESENT == 0 {
            return Err(TrampolineError::NoKernelHalf(cr3));
        }
        table = entry & ADDR_MASK;
    }
    Ok(table + 8 * PGD_SLOT)
}

/// The registers after a `syscall` that entered the kernel properly: what
/// the VMM makes of the state the doorbell exit left.
pub fn kernel_entry(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    star: u64,
    sfmask: u64,
    lstar: u64,
) -> (kvm_regs, kvm_sregs) {
    let (mut r, mut s) = (*regs, *sregs);
    let cs = ((star >> 32) & 0xfffc) as u16;
    let segs = flat_segments();
    s.cs = segs[1].kvm(cs);
    s.ss = segs[2].kvm(cs + 8);
    // R11 holds RFLAGS as they were at the `syscall`.
    r.rflags = (r.r11 & !sfmask & !RFLAGS_RF) | RFLAGS_FIXED;
    r.rip = lstar;
    (r, s)
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) -> Result<(), TrampolineError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|_| {
        TrampolineError::Kvm(
            "building KVM_SET_MSRS",
            kvm_ioctls::Error::new(libc::EINVAL),
        )
    })?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(TrampolineError::Kvm(
            "KVM_SET_MSRS",
            kvm_ioctls::Error::new(libc::EINVAL),
        )),
        Err(e) => Err(TrampolineError::Kvm("KVM_SET_MSRS", e)),
    }
}

impl Trampoline {
    /// A trampoline that has seen no MSR write yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The MSR values the kernel wrote so far. The vCPUs must be paused,
    /// so that no write is under way.
    pub fn save(&self) -> TrampolineState {
        TrampolineState {
            kernel_lstar: self.kernel_lstar.load(Ordering::Acquire),
            star: self.star.load(Ordering::Acquire),
            sfmask: self.sfmask.load(Ordering::Acquire),
        }
    }

    /// Takes the values a snapshot saved, before any vCPU runs. The
    /// trampoline's page-table entry is in the restored guest memory, and
    /// the vCPUs' LSTAR (restored with their MSRs) already points at it.
    pub fn restore(&self, s: &TrampolineState) {
        self.star.store(s.star, Ordering::Release);
        self.sfmask.store(s.sfmask, Ordering::Release);
        self.kernel_lstar.store(s.kernel_lstar, Ordering::Release);
    }

    /// The guest wrote `data` to the filtered MSR `index`: perform it, and
    /// for LSTAR install the trampoline instead. Returns true when the
    /// trampoline was installed.
    pub fn on_wrmsr(
        &self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        index: u32,
        data: u64,
    ) -> Result<bool, TrampolineError> {
        match index {
            MSR_STAR => self.star.store(data, Ordering::Release),
            MSR_SFMASK => self.sfmask.store(data, Ordering::Release),
            MSR_LSTAR => {
                self.install(vcpu, mem)?;
                self.kernel_lstar.store(data, Ordering::Release);
                set_msr(vcpu, MSR_LSTAR, TRAMPOLINE_VA)?;
                return Ok(true);
            }
            _ => {}
        }
        set_msr(vcpu, index, data)?;
        Ok(false)
    }

    /// Writes the slot-401 entry into the 4-level top page table of
    /// `vcpu`'s CR3.
    fn install(&self, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), TrampolineError> {
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| TrampolineError::Kvm("KVM_GET_SREGS", e))?;
        let cr3 = sregs.cr3;
        let read = |addr: u64| {
            mem.read_obj::<u64>(GuestAddress(addr))
                .map_err(|e| TrampolineError::Memory(addr, e))
        };
        let slot = slot_address(cr3, sregs.cr4, read)?;
        let entry: u64 = mem
            .read_obj(GuestAddress(slot))
            .map_err(|e| TrampolineError::Memory(slot, e))?;
        if entry != 0 && entry & ADDR_MASK != PUD_ADDR {
            return Err(TrampolineError::SlotInUse { cr3, entry });
        }
        mem.write_obj(pgd_entry(), GuestAddress(slot))
            .map_err(|e| TrampolineError::Memory(slot, e))?;
        tracing::info!(
            cr3 = format_args!("{cr3:#x}"),
            "host compat: system-call trampoline mapped"
        );
        Ok(())
    }

    /// The doorbell rang: enter the kernel as `syscall` should have.
    pub fn enter_kernel(&self, vcpu: &VcpuFd) -> Result<(), TrampolineError> {
        let regs = vcpu
            .get_regs()
            .map_err(|e| TrampolineError::Kvm("KVM_GET_REGS", e))?;
        let lstar = self.kernel_lstar.load(Ordering::Acquire);
        if lstar == 0 {
            return Err(TrampolineError::NoKernelEntry(regs.rip));
        }
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| TrampolineError::Kvm("KVM_GET_SREGS", e))?;
        let star = self.star.load(Ordering::Acquire);
        let sfmask = self.sfmask.load(Ordering::Acquire);
        let (r, s) = kernel_entry(&regs, &sregs, star, sfmask, lstar);
        // Segments first: with CS at CPL0 the new RIP is a kernel address.
        vcpu.set_sregs(&s)
            .map_err(|e| TrampolineError::Kvm("KVM_SET_SREGS", e))?;
        vcpu.set_regs(&r)
            .map_err(|e| TrampolineError::Kvm("KVM_SET_REGS", e))
    }
}

/// The doorbell page on the MMIO bus: a write hands the vCPU to the
/// trampoline's kernel entry.
pub struct Doorbell;

impl BusDevice for Doorbell {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}

    fn write_trap(&mut self, _offset: u64, _data: &[u8]) -> Option<VcpuTrap> {
        Some(VcpuTrap::SyscallEntry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_and_code() {
        assert_eq!(PGD_SLOT, 401);
        let c = code();
        assert_eq!(c[0], 0xa2);
        assert_eq!(u64::from_le_bytes(c[1..9].try_into().unwrap()), DOORBELL_VA);
    }

    #[test]
    fn pages_map_code_and_doorbell_for_user_mode() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20)
            .unwrap()
            .mem;
        write_pages(&mem).unwrap();
        let walk = |va: u64| -> u64 {
            let mut table = pgd_entry() & ADDR_MASK;
            let mut e = 0;
            for shift in [30u32, 21, 12] {
                e = mem
                    .read_obj::<u64>(GuestAddress(table + 8 * ((va >> shift) & 0x1ff)))
                    .unwrap();
                assert_ne!(e & USER, 0, "user bit at level {shift}");
                assert_eq!(e >> 63, 0, "executable at level {shift}");
                table = e & ADDR_MASK;
            }
            e
        };
        assert_eq!(walk(TRAMPOLINE_VA) & ADDR_MASK, CODE_ADDR);
        assert_eq!(walk(TRAMPOLINE_VA) & WRITABLE, 0);
        assert_eq!(walk(DOORBELL_VA) & ADDR_MASK, COMPAT_DOORBELL_ADDR);
        let mut c = [0u8; 11];
        mem.read_slice(&mut c, GuestAddress(CODE_ADDR)).unwrap();
        assert_eq!(c.to_vec(), code());
    }

    #[test]
    fn slot_with_4_and_5_level_paging() {
        let none = |_| -> Result<u64, TrampolineError> { panic!("no read expected") };
        assert_eq!(
            slot_address(0x2a1_0000 | 0x5, 0, none).unwrap(),
            0x2a1_0000 + 8 * 401
        );
        let p4d = |a| {
            assert_eq!(a, 0x10_0000 + 8 * 511);
            Ok(0x20_0000 | TABLE)
        };
        assert_eq!(
            slot_address(0x10_0000, CR4_LA57, p4d).unwrap(),
            0x20_0000 + 8 * 401
        );
        assert!(slot_address(0x10_0000, CR4_LA57, |_| Ok(0)).is_err());
    }

    #[test]
    fn state_saves_and_restores() {
        let t = Trampoline::new();
        assert_eq!(t.save(), TrampolineState::default());
        assert!(!t.save().installed());
        let s = TrampolineState {
            kernel_lstar: 0xffff_ffff_81a0_0080,
            star: (0x23u64 << 48) | (0x10 << 32),
            sfmask: 0x47700,
        };
        t.restore(&s);
        assert_eq!(t.save(), s);
        assert!(t.save().installed());
    }

    #[test]
    fn kernel_entry_is_what_syscall_does() {
        let regs = kvm_regs {
            rip: TRAMPOLINE_VA + 9,
            rcx: 0x40_1000,
            r11: 0x246 | RFLAGS_RF,
            rflags: 0x246,
            ..Default::default()
        };
        // Linux: STAR = __USER32_CS << 48 | __KERNEL_CS << 32; SFMASK
        // clears TF, DF, IF, AC and more.
        let star = (0x23u64 << 48) | (0x10 << 32);
        let sfmask = 0x47700;
        let (r, s) = kernel_entry(
            &regs,
            &kvm_sregs::default(),
            star,
            sfmask,
            0xffff_ffff_81a0_0000,
        );
        assert_eq!(r.rip, 0xffff_ffff_81a0_0000);
        assert_eq!(r.rflags, 0x46);
        assert_eq!(r.rcx, 0x40_1000, "return address stays in RCX");
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x10, 0, 1));
        assert_eq!((s.ss.selector, s.ss.dpl), (0x18, 0));
    }
}
