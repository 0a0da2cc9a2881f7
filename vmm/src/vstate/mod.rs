//! The KVM objects of a VM: guest memory, the VM itself, and its vCPUs.

pub mod dirty;
pub mod dirty_bitmap;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
