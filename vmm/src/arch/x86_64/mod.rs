//! x86-64: the guest-physical layout and the state a vCPU starts in.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod paging;
pub mod regs;
