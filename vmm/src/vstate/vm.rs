//! The KVM VM: memory slots and the in-kernel interrupt controller and timer.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use std::sync::Arc;

use super::dirty::{DirtyMethod, DirtyRings, KvmDirtyLog};
use super::memory::{GuestMemoryMmap, RamLayout};

/// Where KVM puts the three pages of its real-mode TSS on Intel hosts: just
/// below the BIOS area at the top of 4 GiB, inside our MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or run on a host with virtualization)")]
    KvmMissing,
    /// /dev/kvm is not accessible.
    #[error("/dev/kvm is not accessible to this user (permission denied): run as root or join the kvm group")]
    KvmDenied,
    /// Opening /dev/kvm failed otherwise.
    #[error("opening /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
}

/// Opens /dev/kvm, saying clearly why it failed.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmDenied,
        _ => VmError::KvmOpen(e),
    })
}

/// A VM with its memory registered.
pub struct Vm {
    /// The KVM VM file descriptor.
    pub fd: VmFd,
    /// How its dirty pages are found (see [`super::dirty`]).
    pub dirty: DirtyMethod,
}

impl Vm {
    /// Creates a VM, chooses its dirty tracking (`SPECVM_DIRTY_TRACKING`
    /// may ask for one, else `default_method` if given, see
    /// [`super::dirty`]), registers every region of `mem` as a memory slot
    /// with dirty logging on, then creates the in-kernel irqchip (PIC,
    /// IOAPIC, local APICs) and PIT.
    ///
    /// The memory goes first, as in Firecracker: a slot registered after
    /// the irqchip waits for a grace period of KVM's SRCU that the irqchip's
    /// setup left behind. `python3 benches/snapshot.py` saw the first slot
    /// of a 256 MiB VM take ~7 ms that way against ~0.15 ms before the
    /// irqchip, most of a snapshot restore (`docs/benchmarks/snapshot.md`).
    pub fn new(
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        default_method: Option<&str>,
    ) -> Result<Self, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        // Before any slot: the dirty ring decides whether slots get a
        // dirty bitmap.
        let wanted = std::env::var("SPECVM_DIRTY_TRACKING").ok();
        let dirty = DirtyMethod::choose(&fd, wanted.as_deref().or(default_method));
        let vm = Self { fd, dirty };
        vm.register_memory(mem)?;
        vm.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        vm.fd
            .create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd
            .create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
        Ok(vm)
    }

    /// The memory tracker's view of this VM's dirty tracking, and the
    /// vCPUs' rings if it uses them (mapped here from `vcpus`, all of the
    /// VM's vCPUs; slot `i` is range `i` of `layout`).
    pub fn dirty_log(
        &self,
        vcpus: &[&VcpuFd],
        layout: &RamLayout,
    ) -> std::io::Result<(KvmDirtyLog, Option<Arc<DirtyRings>>)> {
        let rings = match self.dirty {
            DirtyMethod::Ring { bytes } => {
                Some(Arc::new(DirtyRings::map(&self.fd, vcpus, bytes, layout)?))
            }
            _ => None,
        };
        Ok((KvmDirtyLog::new(self.dirty, rings.clone()), rings))
    }

    fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's mapping lives as long as `mem`, which the
            // VMM keeps until the VM is destroyed; KVM accesses guest memory
            // only through this slot.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }
}

impl crate::persist::Persist for Vm {
    type State = super::vm_state::VmState;
    type Error = super::vcpu_state::StateError;

    /// The irqchips, PIT and clock (see [`super::vm_state::save`]).
    fn save(&self) -> Result<Self::State, Self::Error> {
        super::vm_state::save(&self.fd)
    }

    /// The irqchips and PIT; the clock is refreshed, not set back (see
    /// [`super::vm_state::restore`]).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        super::vm_state::restore(&self.fd, state)
    }
}
