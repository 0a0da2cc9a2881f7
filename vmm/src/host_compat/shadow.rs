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
//! The move runs on the host's boot CPU ([`OnBootCpu`]). Each slot update
//! waits for a grace period of KVM's SRCU, and the kernel's SRCU, while
//! uncontended (its "small" mode), runs a grace period's callbacks on the
//! boot CPU. On this 2-CPU host the boot CPU is often idle, and waking it
//! costs the waiting thread about a hundred microseconds per move:
//! `spec_bench` measured the move at 113-187 µs (median) from CPU 1 and
//! 54-64 µs from CPU 0, and the whole abort at 159-171 µs against 84-95 µs
//! with the thread moved to CPU 0 for the slot change only
//! (`docs/benchmarks/checkpoint.md`).
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
        if skip_for_measurement() {
            return Ok(());
        }
        let _cpu = OnBootCpu::enter();
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

/// Whether `SPECVM_UNSAFE_SKIP_SHADOW_RESET=1` asks to skip the reset.
///
/// For measurement only: `benches/checkpoint.py --shadow-cost` runs the
/// guest-driven round trips with and without it, to show what the reset
/// (the slot move, then the guest's faults while KVM rebuilds its shadow
/// tables) costs on this host, and so about what a host with EPT/NPT would
/// see. It is unsafe for any guest that changes its page tables while it
/// speculates: after an abort it would run on through translations of the
/// page tables from after the checkpoint. `spec_bench` does not, so its
/// results stay right. The VMM says so once, at the first rollback.
fn skip_for_measurement() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| {
        let skip = std::env::var("SPECVM_UNSAFE_SKIP_SHADOW_RESET").as_deref() == Ok("1");
        if skip {
            tracing::warn!(
                "SPECVM_UNSAFE_SKIP_SHADOW_RESET=1: rollbacks keep KVM's shadow page tables; \
                 a guest that changed its page tables while speculating will misbehave \
                 (for measurement only)"
            );
        }
        skip
    })
}

/// Keeps the calling thread on the boot CPU (CPU 0 on x86) while it lives,
/// then gives the thread back the CPUs it had. It does nothing where the
/// thread may not run on CPU 0 (a user's `taskset`, a cgroup), or already
/// runs only there; a refused affinity change is ignored, since it costs
/// time, never correctness.
///
/// Written on `libc` directly: two system calls, and the VMM has no crate
/// for affinity otherwise.
struct OnBootCpu {
    /// The affinity to put back.
    before: Option<libc::cpu_set_t>,
}

impl OnBootCpu {
    const BOOT_CPU: usize = 0;

    fn enter() -> Self {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `cpu_set_t` is plain bits; all zeros is the empty set.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set is `size` bytes and lives across the call.
        if unsafe { libc::sched_getaffinity(0, size, &mut before) } != 0 {
            return Self { before: None };
        }
        // SAFETY: CPU_ISSET and CPU_COUNT only read the set.
        let (allowed, count) = unsafe {
            (
                libc::CPU_ISSET(Self::BOOT_CPU, &before),
                libc::CPU_COUNT(&before),
            )
        };
        if !allowed || count == 1 {
            return Self { before: None };
        }
        // SAFETY: as above.
        let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: BOOT_CPU is within the set's size.
        unsafe { libc::CPU_SET(Self::BOOT_CPU, &mut only) };
        // SAFETY: the set is `size` bytes and lives across the call.
        let moved = unsafe { libc::sched_setaffinity(0, size, &only) } == 0;
        Self {
            before: moved.then_some(before),
        }
    }
}

impl Drop for OnBootCpu {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            // SAFETY: the set is a `cpu_set_t` read back from the kernel.
            unsafe {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), before);
            }
        }
    }
}
