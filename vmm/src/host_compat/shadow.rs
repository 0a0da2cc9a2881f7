//! Dropping KVM's shadow page tables after a rollback.
//!
//! On `kvm_pvm` the guest's page tables are shadowed by KVM (there is no
//! EPT/NPT). KVM write-protects the guest's page-table pages so that the
//! *guest's* writes to them reach its shadow copies, but a rollback changes
//! guest memory from the host side: the pages go back to the memory file
//! (`MADV_DONTNEED`), which zaps the mappings *of* those pages, not the
//! shadow pages built *from* them. A rolled-back guest page table would
//! then still be translated through the shadow of its newer content. Found
//! in this project's Linux test: after a speculation that ran processes
//! and was rolled back, a new `ls` ran with corrupted memory (`ls:
//! %s%s%s: No such file or directory`), while bare guests, whose page
//! tables never change, rolled back cleanly.
//!
//! Deleting a memory slot makes KVM free every shadow page of it; the slot
//! is then registered again as it was, with dirty logging. The cost grows
//! with the shadow pages KVM holds and the slot's size (KVM reallocates its
//! per-page metadata), so it is done only where shadow paging is in use:
//! with hardware nested paging the hardware walks the guest's tables itself.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::spec::memory::SlotInfo;

/// Deletes and re-creates every slot of `slots`, so KVM rebuilds its shadow
/// page tables from the guest's (restored) page tables.
pub fn drop_shadow_pages(vm: &VmFd, slots: &[SlotInfo]) -> Result<(), kvm_ioctls::Error> {
    for s in slots {
        let mut r = kvm_userspace_memory_region {
            slot: s.slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: s.gpa,
            memory_size: 0,
            userspace_addr: s.host,
        };
        // SAFETY: a zero-size region deletes the slot; KVM no longer
        // touches the mapping through it.
        unsafe { vm.set_user_memory_region(r) }?;
        r.memory_size = s.size;
        // SAFETY: the same mapping as before, which the VMM keeps mapped
        // for the VM's lifetime.
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}
