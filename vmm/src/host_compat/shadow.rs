//! Dropping KVM's shadow page tables after a rollback.
//!
//! On `kvm_pvm` the guest's page tables are shadowed by KVM (there is no
//! EPT/NPT). KVM write-protects the guest's page-table pages so that the
//! *guest's* writes to them reach its shadow copies, but a rollback changes
//! guest memory from the host side: the pages go back to the memory file
//! (`MADV_DONTNEED`), which zaps the mappings *of* those pages, not the
//! shadow pages built *from* them. A rolled-back guest page table would
//! then still be translated through the shadow of its newer content.
//!
//! KVM has no ioctl to drop shadow pages by guest address. Deleting or
//! moving a memory slot does it: x86 KVM then makes every shadow page
//! obsolete at once (`kvm_mmu_zap_all_fast`, the default behaviour, the
//! `KVM_X86_QUIRK_SLOT_ZAP_ALL` quirk), and rebuilds the shadow tables from
//! the guest's tables as the guest runs on. So the VM gets one extra slot
//! of a single page, outside guest RAM, whose only job is to move between
//! two guest addresses, once after each rollback. (It used to be deleted
//! and created again: two slot updates, each waiting for KVM's SRCU grace
//! period; one move is one update. See `docs/benchmarks/checkpoint.md`
//! for the cost of each.) Deleting a RAM slot instead
//! would cost in proportion to guest memory (KVM frees and reallocates the
//! slot's per-page metadata and dirty bitmap: 2-6 ms at 4 GiB, measured
//! with `benches/checkpoint.py`); this one page costs the same at any
//! memory size.
//!
//! This is only needed where KVM shadows the guest's page tables: with
//! hardware nested paging (EPT/NPT) the hardware walks the guest's tables
//! itself, and a rollback needs nothing more than the memory.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::MmapRegion;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::arch::x86_64::layout::{SHADOW_RESET_ADDR, SHADOW_RESET_ALT_ADDR};

/// The slot number of the reset page: far above the RAM slots (one per
/// RAM region, numbered from 0).
pub const SHADOW_RESET_SLOT: u32 = 511;

/// The one-page memory slot whose deletion drops every shadow page.
#[derive(Debug)]
pub struct ShadowReset {
    page: MmapRegion,
    /// Whether the slot is at [`SHADOW_RESET_ALT_ADDR`] now.
    at_alt: AtomicBool,
}

impl ShadowReset {
    /// Maps the page and registers its slot with `vm`.
    pub fn new(vm: &VmFd) -> Result<Self, kvm_ioctls::Error> {
        let page = MmapRegionBuilder::new(4096)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        let s = Self {
            page,
            at_alt: AtomicBool::new(false),
        };
        s.set(vm, SHADOW_RESET_ADDR, 4096)?;
        Ok(s)
    }

    fn set(&self, vm: &VmFd, gpa: u64, size: u64) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot: SHADOW_RESET_SLOT,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.page.as_ptr() as u64,
        };
        // SAFETY: the page is mapped for as long as `self` lives, and the
        // slot is deleted or replaced only through `self`; KVM reads the
        // page only through the slot. A zero size deletes the slot.
        unsafe { vm.set_user_memory_region(r) }
    }

    /// Moves the slot to its other address: KVM drops every shadow page,
    /// and rebuilds them from the guest's (restored) page tables.
    pub fn drop_shadow_pages(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        let alt = self.at_alt.load(Ordering::Relaxed);
        let to = if alt {
            SHADOW_RESET_ADDR
        } else {
            SHADOW_RESET_ALT_ADDR
        };
        if std::env::var_os("SPECVM_SHADOW_RESET_DELETE").is_some() {
            // The former way, kept to measure against: delete, create.
            self.set(
                vm,
                if alt {
                    SHADOW_RESET_ALT_ADDR
                } else {
                    SHADOW_RESET_ADDR
                },
                0,
            )?;
        }
        self.set(vm, to, 4096)?;
        self.at_alt.store(!alt, Ordering::Relaxed);
        Ok(())
    }
}
